"""The health timer's script: restarts after N failed probes, counts its restarts across runs,
and publishes the count for node_exporter's textfile collector."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_firewall import render


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Stand-ins for systemctl, curl and docker that record calls and answer as the test says."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(
        '#!/bin/sh\nif [ "$1" = is-active ]; then cat "$HOST/active"; exit 0; fi\n'
        'echo "$*" >> "$HOST/systemctl.log"\n'
    )
    (bin_dir / "curl").write_text('#!/bin/sh\nexit "$(cat "$HOST/curl-exit")"\n')
    (bin_dir / "docker").write_text('#!/bin/sh\necho "$*" >> "$HOST/docker.log"\n')
    for tool in ("systemctl", "curl", "docker"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "active").write_text("active\n")
    (tmp_path / "textfile").mkdir()
    script = render(
        "vllm-health-check.j2",
        _vllm_service_health_restarts_file=str(tmp_path / "restarts"),
        _vllm_service_textfile_dir=str(tmp_path / "textfile"),
    ).replace("/run/servekit", str(tmp_path / "run"))
    (tmp_path / "check").write_text(script)
    return tmp_path


def probe(host: Path, healthy: bool) -> str:
    (host / "curl-exit").write_text("0" if healthy else "22")
    env = dict(os.environ, HOST=str(host), PATH=f"{host / 'bin'}:{os.environ['PATH']}")
    return subprocess.run(
        ["sh", str(host / "check")], env=env, capture_output=True, text=True, check=True
    ).stdout


def published(host: Path) -> dict[str, int]:
    text = (host / "textfile" / "servekit_vllm_health.prom").read_text()
    return {
        line.split()[0]: int(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def restarts(host: Path) -> list[str]:
    log = host / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def test_three_failures_restart_once_and_the_count_is_published(host):
    assert probe(host, True) == ""
    assert published(host) == {
        "servekit_vllm_health_restarts_total": 0,
        "servekit_vllm_health_consecutive_failures": 0,
    }
    probe(host, False)
    probe(host, False)
    assert published(host)["servekit_vllm_health_consecutive_failures"] == 2
    assert restarts(host) == []
    out = probe(host, False)
    assert "restarting vllm.service after 3 failed health probes" in out
    assert restarts(host) == ["restart --no-block vllm.service"]
    # Killed first: a hung server gets no graceful drain.
    assert (host / "docker.log").read_text().splitlines() == ["kill --signal KILL vllm"]
    assert published(host) == {
        "servekit_vllm_health_restarts_total": 1,
        "servekit_vllm_health_consecutive_failures": 3,
    }
    # The streak starts again; the counter only grows, and lives outside /run.
    probe(host, True)
    assert published(host) == {
        "servekit_vllm_health_restarts_total": 1,
        "servekit_vllm_health_consecutive_failures": 0,
    }
    for _ in range(3):
        probe(host, False)
    assert (host / "restarts").read_text().strip() == "2"
    assert published(host)["servekit_vllm_health_restarts_total"] == 2
    assert not list((host / "textfile").glob(".*")), "a temporary file was left behind"


def test_a_unit_that_is_not_active_is_left_to_systemd(host):
    (host / "active").write_text("activating\n")
    for _ in range(4):
        probe(host, False)
    assert restarts(host) == []
    assert published(host)["servekit_vllm_health_consecutive_failures"] == 0


def test_without_node_exporter_nothing_is_published(host):
    (host / "textfile").rmdir()
    for _ in range(3):
        probe(host, False)
    assert restarts(host) == ["restart --no-block vllm.service"]
    assert not (host / "textfile").exists()

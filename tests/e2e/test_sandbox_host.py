"""The sandbox end to end: images, registry, mirror and one sandbox host, then ``down()``.

Needs a Docker engine on this machine (``scripts/ensure-host-tools.sh``) and root for the first
build of the base image (debootstrap). The first run builds the images (~5 min on two
cores); later runs reuse them. ``down()`` at the end removes the sandbox and
``down(purge=True)`` its registry cache too, and nothing brings it back: run this module last
(`make test` runs it after the fleet; the e2e conftest orders it after the others).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from servekit.sandbox import SandboxState, down, ensure_docker_engine, status, up
from servekit.sandbox.common import docker_client
from servekit.sandbox.hosts import ssh_command
from servekit.sandbox.registry import REGISTRY_CONTAINER, REGISTRY_VOLUME
from servekit.sandbox.state import SandboxPaths, cache_volume, host_volume

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sandbox():
    ensure_docker_engine()
    return up(hosts=1)


def ssh(state: SandboxState, command: str, known_hosts: bool = True) -> subprocess.CompletedProcess:
    host = state.hosts[0]
    cmd = ssh_command(
        host.ssh_port, Path(state.ssh_key), Path(state.known_hosts) if known_hosts else None
    )
    return subprocess.run([*cmd, command], capture_output=True, text=True, timeout=60)


def test_state_describes_the_sandbox(sandbox: SandboxState):
    paths = SandboxPaths()
    on_disk = json.loads(paths.state.read_text())
    assert on_disk["hosts"][0]["name"] == "servekit-sandbox-1"
    assert (sandbox.hosts[0].ssh_port, sandbox.hosts[0].api_port) == (2222, 8000)
    assert re.fullmatch(
        r"servekit-control:5000/servekit/vllm-cpu@sha256:[0-9a-f]{64}",
        paths.vllm_image.read_text().strip(),
    )
    assert paths.vllm_image.read_text().strip() == sandbox.vllm_image
    key = Path(sandbox.ssh_key)
    assert key.stat().st_mode & 0o777 == 0o600
    for name, ref in sandbox.images.items():
        assert re.fullmatch(rf"servekit/{name}:[0-9a-f]{{12}}", ref)


def test_systemd_is_running(sandbox: SandboxState):
    container = docker_client().containers.get(sandbox.hosts[0].name)
    result = container.exec_run(["systemctl", "is-system-running"])
    assert result.output.decode().strip() == "running"
    assert container.attrs["Config"]["StopSignal"] == "SIGRTMIN+3"


def test_sshd_answers_with_the_generated_key(sandbox: SandboxState):
    # Host key checked against the known_hosts file up() wrote from the host's own files.
    result = ssh(sandbox, "hostname && systemctl is-system-running && id -u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sandbox-1", "running", "0"]


def test_password_login_is_off(sandbox: SandboxState):
    result = ssh(sandbox, "sshd -T | grep -iE '^(passwordauthentication|permitrootlogin) '")
    assert result.returncode == 0, result.stderr
    settings = dict(line.split() for line in result.stdout.strip().splitlines())
    assert settings == {"passwordauthentication": "no", "permitrootlogin": "without-password"}


def test_label_and_nested_docker_volume(sandbox: SandboxState):
    client = docker_client()
    hosts = client.containers.list(filters={"label": "servekit.role=sandbox-host"})
    ours = [c for c in hosts if c.name.startswith("servekit-sandbox-")]
    assert [c.name for c in ours] == ["servekit-sandbox-1"]
    assert ours[0].labels["servekit.sandbox.index"] == "1"
    mounts = {m["Destination"]: m for m in ours[0].attrs["Mounts"]}
    assert mounts["/var/lib/docker"]["Name"] == host_volume(1)
    assert mounts["/var/cache/vllm"]["Name"] == cache_volume(1)


def test_control_services_reachable_from_inside(sandbox: SandboxState):
    result = ssh(
        sandbox,
        "curl -fsS http://servekit-control:8090/healthz && echo && "
        "curl -fsS -o /dev/null -w '%{http_code}' http://servekit-control:5000/v2/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "200"]


def test_up_is_idempotent(sandbox: SandboxState):
    again = up(hosts=1, progress=lambda _msg: None)
    assert again.hosts[0].container_id == sandbox.hosts[0].container_id
    assert again.vllm_image == sandbox.vllm_image
    assert again.mirror["pid"] == sandbox.mirror["pid"]


def test_down_removes_everything(sandbox: SandboxState):
    down()
    client = docker_client()
    assert client.containers.list(all=True, filters={"label": "servekit.role=sandbox-host"}) == []
    assert [c.name for c in client.containers.list(all=True)].count(REGISTRY_CONTAINER) == 0
    volumes = {v.name for v in client.volumes.list()}
    assert host_volume(1) not in volumes and cache_volume(1) not in volumes
    assert REGISTRY_VOLUME in volumes, "the registry cache survives a plain down"
    st = status()
    assert st["hosts"] == [] and st["mirror"]["pid"] is None and not st["up"]
    assert not SandboxPaths().state.exists()
    down()  # idempotent


def test_purge_also_drops_the_registry_cache():
    down(purge=True)
    assert REGISTRY_VOLUME not in {v.name for v in docker_client().volumes.list()}

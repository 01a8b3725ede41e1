"""The sandbox runs the production command line: vllm.service for a GPU host and for the
sandbox, rendered from the role as the template module renders it, differ only in named places.
"""

from __future__ import annotations

import difflib
import json
import shlex
from pathlib import Path

import pytest
import yaml
from test_firewall import ROLE, render
from test_route_gate import gate

from servekit.images import vllm_version

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_VARS = ROOT / "inventory" / "sandbox" / "group_vars" / "gpu_hosts.yml"
DIGEST = "sha256:" + "ab" * 32
GPU_REPOSITORY = "docker.io/vllm/vllm-openai"


def _lock(directory: Path, repository: str) -> Path:
    tag = f"{repository}:v{vllm_version(ROOT)}"
    (directory / "images.lock.yml").write_text(
        yaml.safe_dump({"images": {tag: {"digest": DIGEST, "resolved": "2026-12-06T10:00:00Z"}}})
    )
    return directory


def _site(tmp_path: Path, name: str, **variables) -> dict:
    """What every host gets from the playbooks, and an inventory directory with a lock."""
    inventory = tmp_path / name
    inventory.mkdir()
    repository = variables.get("vllm_service_image_repository", GPU_REPOSITORY)
    return {
        "servekit_vllm_version": vllm_version(ROOT),
        "inventory_dir": str(_lock(inventory, repository)),
        "inventory_file": str(inventory / "hosts.yml"),
        "role_path": str(ROLE),
        **variables,
    }


def _sandbox_vars() -> dict:
    return {
        k: v
        for k, v in (yaml.safe_load(SANDBOX_VARS.read_text()) or {}).items()
        if not k.startswith("ansible_")
    }


def docker_run(unit: str) -> list[str]:
    """The words of ExecStart (continuations joined)."""
    for line in unit.replace("\\\n", " ").splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise AssertionError(f"no ExecStart in:\n{unit}")


@pytest.fixture
def units(tmp_path) -> dict[str, str]:
    gpu = render("vllm.service.j2", **_site(tmp_path, "gpu"))
    sandbox = render("vllm.service.j2", **_site(tmp_path, "sandbox", **_sandbox_vars()))
    return {"gpu": gpu, "sandbox": sandbox}


def test_gpu_host_runs_the_official_image_of_the_pinned_release_by_locked_digest(units):
    words = docker_run(units["gpu"])
    image = f"{GPU_REPOSITORY}:v{vllm_version(ROOT)}@{DIGEST}"
    assert image in words
    # `vllm serve MODEL` (the image's entrypoint): the model follows the image, no --model.
    assert words[words.index(image) + 1] == "/models/Qwen3-8B"
    assert "--model" not in words


def test_the_sandbox_differs_from_a_gpu_host_only_in_named_places(units):
    gpu, sandbox = docker_run(units["gpu"]), docker_run(units["sandbox"])
    release = f"v{vllm_version(ROOT)}@{DIGEST}"
    # Each difference and why: the image (CPU build of the same release, same lock), the
    # GPU flags, and two settings of the sandbox's inventory (its private network binds every
    # address; two CPU cores need no 15-minute start budget).
    named = {
        f"{GPU_REPOSITORY}:{release}": f"servekit-control:5000/servekit/vllm-cpu:{release}",
        "--gpus": None,
        "all": None,
        "--tensor-parallel-size": None,
        "1": None,
        "--gpu-memory-utilization": None,
        "0.9": None,
        "127.0.0.1:8000:8000": "0.0.0.0:8000:8000",
    }
    diff = [line for line in difflib.ndiff(gpu, sandbox) if line.startswith(("- ", "+ "))]
    removed = [line[2:] for line in diff if line.startswith("- ")]
    added = [line[2:] for line in diff if line.startswith("+ ")]
    assert sorted(removed) == sorted(named)
    assert sorted(added) == sorted(v for v in named.values() if v)
    for unit, words in (("gpu", gpu), ("sandbox", sandbox)):
        assert words[:2] == ["/usr/bin/docker", "run"], unit
        assert "--shutdown-timeout" in words, unit


def test_only_the_start_budget_differs_outside_the_command_line(units):
    def rest(unit: str) -> list[str]:
        lines = unit.replace("\\\n", " ").splitlines()
        return [line for line in lines if not line.startswith("ExecStart=")]

    changed = [
        line[2:]
        for line in difflib.ndiff(rest(units["gpu"]), rest(units["sandbox"]))
        if line.startswith(("- ", "+ "))
    ]
    assert changed == ["TimeoutStartSec=900", "TimeoutStartSec=600"]


def test_stop_gives_the_drain_its_time(tmp_path):
    unit = render("vllm.service.j2", **_site(tmp_path, "gpu", vllm_service_shutdown_timeout=50))
    words = docker_run(unit)
    assert words[words.index("--shutdown-timeout") + 1] == "50"
    assert "ExecStop=/usr/bin/docker stop --time 65 vllm" in unit
    stop_sec = next(x for x in unit.splitlines() if x.startswith("TimeoutStopSec="))
    assert int(stop_sec.split("=")[1]) > 65


def test_the_cpu_environment_is_the_only_difference_in_the_env_file(tmp_path):
    gpu = render("vllm.env.j2", **_site(tmp_path, "gpu"))
    sandbox_vars = _sandbox_vars()
    sandbox = render("vllm.env.j2", **_site(tmp_path, "sandbox", **sandbox_vars))
    diff = list(difflib.ndiff(gpu.splitlines(), sandbox.splitlines()))
    added = [line[2:] for line in diff if line.startswith("+ ")]
    assert not [line for line in diff if line.startswith("- ")]
    assert sorted(added) == sorted(f"{k}={v}" for k, v in sandbox_vars["vllm_service_env"].items())


def test_the_key_and_the_gate_settings_stay_out_of_the_env_file(tmp_path):
    """A change of key, routes or /metrics networks must not touch the env file (a restart)."""
    site = _site(tmp_path, "gpu")
    plain = render("vllm.env.j2", **site)
    changed = render(
        "vllm.env.j2",
        **site,
        vllm_service_api_key="k" * 40,
        vllm_service_allowed_routes=["/health", "/v1/embeddings"],
        vllm_service_metrics_allowed_cidrs=["10.0.5.0/24"],
        vllm_service_metrics_public=True,
    )
    assert changed == plain
    assert "VLLM_API_KEY" not in plain and "k" * 40 not in changed
    assert "SERVEKIT_GATE_CONFIG=/etc/servekit/gate/gate.json" in plain.splitlines()


def test_the_gate_reads_its_settings_from_the_mounted_directory(units):
    for unit, words in ((u, docker_run(units[u])) for u in ("gpu", "sandbox")):
        mounts = [words[i + 1] for i, word in enumerate(words) if word == "--volume"]
        assert "/etc/vllm/gate:/etc/servekit/gate:ro" in mounts, (unit, mounts)


def test_the_gate_settings_are_written_privately_and_restart_nothing():
    tasks = yaml.safe_load((ROLE / "tasks" / "configure.yml").read_text())
    task = next(
        t for t in tasks if t.get("ansible.builtin.template", {}).get("src") == "gate.json.j2"
    )
    assert "notify" not in task and task["no_log"] is True
    assert task["ansible.builtin.template"]["mode"] == "0600"
    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    # In the one state read, so that a converged host skips the task (changed=0).
    assert "{{ _vllm_service_gate_file }}" in role_vars["_vllm_service_files"]
    gate_dir = {"path": "{{ _vllm_service_gate_dir }}", "mode": "0700"}
    assert gate_dir in role_vars["_vllm_service_base_dirs"]


def test_the_role_writes_what_the_gate_reads(tmp_path):
    """gate.json rendered from the inventory's values, then loaded by the gate itself."""
    key, sandbox = "k" * 40, _sandbox_vars()
    text = render(
        "gate.json.j2",
        **_site(tmp_path, "sandbox", **sandbox),
        vllm_service_api_key=key,
        vllm_service_metrics_public="false",  # a string from -e: still a boolean in the file
    )
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert json.loads(text) == {
        "allowed_routes": defaults["vllm_service_allowed_routes"],
        "metrics_allowed_cidrs": sandbox["vllm_service_metrics_allowed_cidrs"],
        "metrics_public": False,
        "api_key": key,
    }
    config = tmp_path / "gate.json"
    config.write_text(text)
    made = gate.RouteGate(None, str(config), "/nonexistent")
    assert made.settings.key == key.encode() and "/v1/chat/completions" in made.settings.routes
    assert made.allows(("172.17.0.1", 1)) and not made.allows(("10.0.5.7", 1))


def test_the_release_is_defined_once():
    """`servekit_vllm_version` has one definition in the roles, playbooks and inventories."""
    definitions = [
        f"{path.relative_to(ROOT)}:{n}"
        for top in ("ansible", "inventory")
        for path in sorted((ROOT / top).rglob("*.yml"))
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if line.startswith("servekit_vllm_version:")
    ]
    assert definitions == ["ansible/playbooks/group_vars/all/vllm.yml:7"]


def test_every_engine_fact_is_of_a_release_and_the_pinned_one_is_there():
    engines = yaml.safe_load((ROLE / "files" / "engines.yml").read_text())
    assert vllm_version(ROOT) in engines
    parsers = engines[vllm_version(ROOT)]["reasoning_parsers"]
    # The parser servekit deploys, and the name the release gives gpt-oss's.
    assert "qwen3" in parsers and "openai_gptoss" in parsers and "gpt_oss" not in parsers

"""`make verify` fails, naming the broken check, for each way a deployment can break."""

from __future__ import annotations

import shutil

import pytest
from sandbox_helpers import INVENTORY, healthy, on_host, started_and_healthy, wait_for

from servekit.verify import VerifyResult, run_verify

pytestmark = pytest.mark.e2e

MODEL_FILE = "/opt/models/Qwen/Qwen3-8B/current/tokenizer_config.json"


def failed(result: VerifyResult) -> set[str]:
    """Names of the failed host checks (test function) and request probes."""
    names = {t.name.split("::")[-1] for h in result.hosts for t in h.tests if t.status == "FAIL"}
    names |= {r.name for run in result.runs for r in run.results if not r.ok and not r.skipped}
    return names


@pytest.fixture
def serving(deployment):
    wait_for(
        started_and_healthy,
        "healthy and started before breaking it",
        600,
    )
    yield
    wait_for(healthy, "healthy again afterwards", 600)


def test_container_killed_and_not_yet_back(serving, tmp_path):
    assert on_host("docker", "kill", "--signal", "KILL", "vllm").returncode == 0
    wait_for(lambda: not healthy(), "/health fails", 30, 0.1)
    result = run_verify(INVENTORY, tmp_path)
    assert not result.ok
    assert "health" in failed(result)


def test_served_model_name_differs_from_the_inventory(serving, tmp_path):
    inventory = tmp_path / "inventory"
    shutil.copytree(INVENTORY.parent, inventory)
    with (inventory / "group_vars" / "gpu_hosts.yml").open("a") as fh:
        fh.write("vllm_service_served_model_name: Qwen3-8B-Instruct\n")
    result = run_verify(inventory / "hosts.yml", tmp_path / "reports")
    assert not result.ok
    assert "models" in failed(result)
    detail = next(r.detail for r in result.runs[0].results if r.name == "models")
    assert "Qwen3-8B-Instruct" in detail and "Qwen3-8B" in detail


def test_model_file_deleted_from_the_host(serving, tmp_path):
    assert on_host("cp", "-p", MODEL_FILE, "/root/model-file.bak").returncode == 0
    assert on_host("rm", MODEL_FILE).returncode == 0
    try:
        result = run_verify(INVENTORY, tmp_path)
    finally:
        assert on_host("cp", "-p", "/root/model-file.bak", MODEL_FILE).returncode == 0
    assert not result.ok
    assert failed(result) == {"test_model_matches_its_manifest"}


def test_verify_writes_every_report(serving, tmp_path):
    result = run_verify(INVENTORY, tmp_path)
    assert result.ok
    for name in ("verify.json", "hosts.junit.xml", "probes.json", "probes.junit.xml"):
        assert (tmp_path / name).exists(), name

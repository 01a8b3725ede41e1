"""`make verify` fails, naming the broken check, for each way a deployment can break. (A
killed server is in test_faults.py: its SIGKILL fault checks verify while the server is down.)"""

from __future__ import annotations

import shutil

import pytest
from sandbox_helpers import (
    INVENTORY,
    failed_checks,
    healthy,
    on_host,
    started_and_healthy,
    wait_for,
)

from servekit.verify import run_verify

pytestmark = pytest.mark.e2e

MODEL_FILE = "/opt/models/Qwen/Qwen3-8B/current/tokenizer_config.json"


@pytest.fixture
def serving(deployment):
    wait_for(
        started_and_healthy,
        "healthy and started before breaking it",
        600,
    )
    yield
    wait_for(healthy, "healthy again afterwards", 600)


def test_served_model_name_differs_from_the_inventory(serving, tmp_path):
    inventory = tmp_path / "inventory"
    shutil.copytree(INVENTORY.parent, inventory)
    with (inventory / "group_vars" / "gpu_hosts.yml").open("a") as fh:
        fh.write("vllm_service_served_model_name: Qwen3-8B-Instruct\n")
    result = run_verify(inventory / "hosts.yml", tmp_path / "reports")
    assert not result.ok
    assert "models" in failed_checks(result)
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
    assert failed_checks(result) == {"test_model_matches_its_manifest"}


def test_verify_writes_every_report(serving, tmp_path):
    result = run_verify(INVENTORY, tmp_path)
    assert result.ok
    for name in ("verify.json", "hosts.junit.xml", "probes.json", "probes.junit.xml"):
        assert (tmp_path / name).exists(), name

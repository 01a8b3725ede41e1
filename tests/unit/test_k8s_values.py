"""`servekit k8s-values`: Helm values for the vLLM production-stack chart from an inventory.

Real inventories read with the real `ansible-inventory`; the output parsed as YAML and
compared field by field with the variables it comes from (the chart's own names:
servingEngineSpec.modelSpec[], vllmConfig, vllmApiKey as a Secret reference).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from servekit.images import vllm_version
from servekit.k8s import K8sValuesError, k8s_name, render, split_image, values_from_inventory

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32
SECRET = "sk-k8s-never-in-values-91c2"


def write(tmp_path: Path, hosts_yml: str, group_vars: str = "") -> Path:
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "hosts.yml").write_text(textwrap.dedent(hosts_yml))
    (tmp_path / "group_vars" / "gpu_hosts.yml").write_text(textwrap.dedent(group_vars))
    return tmp_path / "hosts.yml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "servekit", "k8s-values", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture
def fleet(tmp_path) -> Path:
    return write(
        tmp_path,
        """
        all:
          children:
            gpu_hosts:
              hosts:
                gpu-01: {ansible_host: 10.0.0.1}
                gpu-02: {ansible_host: 10.0.0.2}
                gpu-03: {ansible_host: 10.0.0.3}
                gpu-04:
                  ansible_host: 10.0.0.4
                  vllm_service_tensor_parallel_size: 4
        """,
        f"""
        servekit_model_id: Qwen/Qwen3-8B
        servekit_model_revision: v1.0.2
        servekit_model_endpoint: http://mirror.lan:8090
        vllm_service_image: registry.lan:5000/vllm/vllm-openai:v0.13.0@{DIGEST}
        vllm_service_served_model_name: Qwen3-8B
        vllm_service_max_model_len: 16384
        vllm_service_reasoning_parser: qwen3
        vllm_service_gpu_memory_utilization: 0.85
        vllm_service_extra_args: [--enable-auto-tool-choice, --tool-call-parser, hermes]
        vllm_service_env: {{VLLM_LOGGING_LEVEL: INFO}}
        vllm_service_api_key: {SECRET}
        """,
    )


def test_values_map_the_inventory_onto_the_chart(fleet):
    proc = cli("--inventory", str(fleet))
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout, "the API key itself must never be in the values"
    data = yaml.safe_load(proc.stdout)
    engine = data["servingEngineSpec"]
    assert engine["vllmApiKey"] == {"secretName": "servekit-vllm-api-key", "secretKey": "api-key"}
    assert "kubectl create secret generic servekit-vllm-api-key" in proc.stdout
    one, four = engine["modelSpec"]
    # Three hosts share one configuration: one spec, three replicas; the 4-GPU host its own.
    assert (one["name"], one["replicaCount"], one["requestGPU"]) == ("qwen3-8b", 3, 1)
    assert (four["name"], four["replicaCount"], four["requestGPU"]) == ("qwen3-8b-2", 1, 4)
    assert four["vllmConfig"]["tensorParallelSize"] == 4
    assert one["repository"] == "registry.lan:5000/vllm/vllm-openai"
    assert one["tag"] == f"v0.13.0@{DIGEST}"
    assert f"{one['repository']}:{one['tag']}".endswith(f"vllm-openai:v0.13.0@{DIGEST}")
    assert (one["modelURL"], one["modelRevision"]) == ("Qwen/Qwen3-8B", "v1.0.2")
    assert one["vllmConfig"] == {
        "enablePrefixCaching": True,
        "maxModelLen": 16384,
        "tensorParallelSize": 1,
        "gpuMemoryUtilization": 0.85,
        "extraArgs": [
            "--served-model-name",
            "Qwen3-8B",
            "--reasoning-parser",
            "qwen3",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
        ],
    }
    assert one["env"] == [
        {"name": "VLLM_USE_MODELSCOPE", "value": "True"},
        {"name": "MODELSCOPE_ENDPOINT", "value": "http://mirror.lan:8090"},
        {"name": "VLLM_LOGGING_LEVEL", "value": "INFO"},
    ]
    assert data["routerSpec"]["enableRouter"] is True


def test_the_shipped_example_inventory(tmp_path):
    # The kit ships no digest nobody here could resolve: the site locks its own.
    tag = f"docker.io/vllm/vllm-openai:v{vllm_version(ROOT)}"
    with pytest.raises(K8sValuesError, match=rf"{tag} \(gpu-01\) has no digest .*make lock-images"):
        values_from_inventory(ROOT / "inventory" / "example" / "hosts.yml")
    inventory = tmp_path / "example"
    shutil.copytree(ROOT / "inventory" / "example", inventory)
    (inventory / "images.lock.yml").write_text(
        yaml.safe_dump({"images": {tag: {"digest": DIGEST, "resolved": "2026-12-06T10:00:00Z"}}})
    )
    data = values_from_inventory(inventory / "hosts.yml")
    specs = data["servingEngineSpec"]["modelSpec"]
    # gpu-02 has two GPUs (host_vars/gpu-02.yml).
    assert [(s["replicaCount"], s["vllmConfig"]["tensorParallelSize"]) for s in specs] == [
        (1, 1),
        (1, 2),
    ]
    assert specs[0]["repository"] == "docker.io/vllm/vllm-openai"
    assert specs[0]["tag"] == f"v{vllm_version(ROOT)}@{DIGEST}"
    assert specs[0]["env"] == [{"name": "VLLM_USE_MODELSCOPE", "value": "True"}]
    # The example's key is a vault reference: a Secret reference, nothing of the key.
    assert data["servingEngineSpec"]["vllmApiKey"]["secretName"] == "servekit-vllm-api-key"
    assert "vault" not in json.dumps(data)


def test_defaults_without_a_key_and_an_image_given_on_the_command_line(tmp_path):
    inventory = write(tmp_path, "all:\n  children:\n    gpu_hosts:\n      hosts:\n        g1: {}\n")
    data = values_from_inventory(inventory, image=f"vllm/vllm-openai@{DIGEST}")
    (spec,) = data["servingEngineSpec"]["modelSpec"]
    assert "vllmApiKey" not in data["servingEngineSpec"]
    assert (spec["repository"], spec["tag"]) == ("vllm/vllm-openai", f"latest@{DIGEST}")
    assert spec["vllmConfig"]["maxModelLen"] == 8192  # the vllm_service default
    assert spec["vllmConfig"]["extraArgs"][:4] == [
        "--served-model-name",
        "Qwen3-8B",
        "--reasoning-parser",
        "qwen3",
    ]
    text = render(data, "inv", "gpu_hosts")
    assert yaml.safe_load(text) == data
    assert "kubectl create secret" not in text


def test_the_image_is_the_locked_digest_of_the_hosts_tag(tmp_path):
    inventory = tmp_path / "sandbox"
    shutil.copytree(
        ROOT / "inventory" / "sandbox", inventory, ignore=shutil.ignore_patterns("images.lock.yml")
    )
    tag = f"servekit-control:5000/servekit/vllm-cpu:v{vllm_version(ROOT)}"
    proc = cli("--inventory", str(inventory / "hosts.yml"))
    assert proc.returncode == 2
    assert f"{tag} (sandbox-1) has no digest in {inventory / 'images.lock.yml'}" in proc.stderr
    assert "make lock-images" in proc.stderr
    (inventory / "images.lock.yml").write_text(
        yaml.safe_dump({"images": {tag: {"digest": DIGEST, "resolved": "2026-12-06T10:00:00Z"}}})
    )
    proc = cli("--inventory", str(inventory / "hosts.yml"))
    assert proc.returncode == 0, proc.stderr
    (spec,) = yaml.safe_load(proc.stdout)["servingEngineSpec"]["modelSpec"]
    assert spec["repository"] == "servekit-control:5000/servekit/vllm-cpu"
    assert spec["tag"] == f"v{vllm_version(ROOT)}@{DIGEST}"
    # The sandbox serves on CPU: no GPUs requested.
    assert spec["requestGPU"] == 0
    proc = cli("--inventory", str(inventory / "hosts.yml"), "--image", f"reg:5000/v@{DIGEST}")
    assert proc.returncode == 0, proc.stderr
    (spec,) = yaml.safe_load(proc.stdout)["servingEngineSpec"]["modelSpec"]
    assert spec["repository"] == "reg:5000/v"


def test_no_hosts_is_an_error(tmp_path):
    inventory = write(tmp_path, "all:\n  children:\n    gpu_hosts: {}\n")
    with pytest.raises(K8sValuesError, match="no hosts"):
        values_from_inventory(inventory)


@pytest.mark.parametrize(
    "ref, expected",
    [
        (
            f"docker.io/vllm/vllm-openai:v0.13.0@{DIGEST}",
            ("docker.io/vllm/vllm-openai", f"v0.13.0@{DIGEST}"),
        ),
        (f"reg.lan:5000/a/b@{DIGEST}", ("reg.lan:5000/a/b", f"latest@{DIGEST}")),
        ("vllm/vllm-openai:v0.13.0", ("vllm/vllm-openai", "v0.13.0")),
        ("reg.lan:5000/img", ("reg.lan:5000/img", "latest")),
    ],
)
def test_split_image(ref, expected):
    assert split_image(ref) == expected


def test_k8s_names():
    assert k8s_name("Qwen3-8B") == "qwen3-8b"
    assert k8s_name("org/Model_v2.1") == "org-model-v2-1"
    assert k8s_name("___") == "model"

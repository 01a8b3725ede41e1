"""`servekit k8s-values`: Helm values for the vLLM production-stack chart from an inventory.

Real inventories read with the real `ansible-inventory`; the output parsed as YAML and
compared field by field with the variables it comes from (the chart's own names:
servingEngineSpec.modelSpec[], vllmConfig, vllmApiKey as a Secret reference). Then merged
over the chart's defaults at the pinned commit, as Helm does, validated against its schema,
and read the way its templates read it (tests/unit/production_stack.py): one claim the
replicas can share, the ModelScope cache on it, /dev/shm a Kubernetes quantity, no GPU
runtime class for CPU, a startup probe that outlasts download and start, no spare pods.
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
from production_stack import (
    QUANTITY,
    chart_defaults,
    claims,
    engine_pods,
    engine_strategy,
    helm_merge,
    install,
    on_claim,
    probe_window,
)

from servekit.images import vllm_version
from servekit.k8s import (
    CHART_VERSION,
    DEFAULT_DOWNLOAD_ALLOWANCE,
    K8sValuesError,
    k8s_name,
    render,
    split_image,
    values,
    values_from_inventory,
)

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
        servekit_k8s_storage_class: nfs-rwx
        """,
    )


def test_values_map_the_inventory_onto_the_chart(fleet):
    proc = cli("--inventory", str(fleet))
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout, "the API key itself must never be in the values"
    data = yaml.safe_load(proc.stdout)
    engine = data["servingEngineSpec"]
    assert engine["vllmApiKey"] == {"secretName": "servekit-vllm-api-key", "secretKey": "api-key"}
    assert (
        f"helm install vllm vllm/vllm-stack --version {CHART_VERSION} -f values.yaml" in proc.stdout
    )
    # The key goes to kubectl on stdin, never in a command line.
    assert "kubectl create secret generic servekit-vllm-api-key --from-file=api-key=/dev/stdin" in (
        proc.stdout
    )
    assert "--from-literal" not in proc.stdout
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
        {"name": "MODELSCOPE_CACHE", "value": "/data/shared-pvc-storage/modelscope"},
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
    # Two hosts, two pods: their model volume must be ReadWriteMany, which needs a class.
    with pytest.raises(K8sValuesError, match=r"servekit_k8s_storage_class .* --storage-class"):
        values_from_inventory(inventory / "hosts.yml")
    data = values_from_inventory(inventory / "hosts.yml", storage_class="cephfs")
    install(data)
    specs = data["servingEngineSpec"]["modelSpec"]
    # gpu-02 has two GPUs (host_vars/gpu-02.yml).
    assert [(s["replicaCount"], s["vllmConfig"]["tensorParallelSize"]) for s in specs] == [
        (1, 1),
        (1, 2),
    ]
    assert specs[0]["repository"] == "docker.io/vllm/vllm-openai"
    assert specs[0]["tag"] == f"v{vllm_version(ROOT)}@{DIGEST}"
    assert specs[0]["env"] == [
        {"name": "VLLM_USE_MODELSCOPE", "value": "True"},
        {"name": "MODELSCOPE_CACHE", "value": "/data/shared-pvc-storage/modelscope"},
    ]
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
    data = yaml.safe_load(proc.stdout)
    (spec,) = data["servingEngineSpec"]["modelSpec"]
    assert spec["repository"] == "servekit-control:5000/servekit/vllm-cpu"
    assert spec["tag"] == f"v{vllm_version(ROOT)}@{DIGEST}"
    # The sandbox serves on CPU: no GPUs requested, and no GPU runtime class, which the
    # chart's defaults would otherwise give every pod.
    assert spec["requestGPU"] == 0
    (pod,) = engine_pods(install(data))
    assert pod.runtime_class is None
    assert "gpuMemoryUtilization" not in spec["vllmConfig"]
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


# --- Checked against the chart (tests/fixtures/production-stack/, vllm-stack 0.1.12) ---

IMAGE = f"registry.lan:5000/vllm/vllm-openai:v0.13.0@{DIGEST}"
START_TIMEOUT = 900  # the vllm_service default


def ten_host_inventory(tmp_path: Path) -> Path:
    """Ten hosts, three tensor parallel sizes, a mirror, Docker's shm syntax and a key."""
    one_gpu = "".join(f"        gpu-{n:02d}: {{ansible_host: 10.0.0.{n}}}\n" for n in range(1, 7))
    two_gpus = "".join(
        f"        gpu-{n:02d}: {{ansible_host: 10.0.0.{n}, vllm_service_tensor_parallel_size: 2}}\n"
        for n in range(7, 10)
    )
    four_gpus = "        gpu-10: {ansible_host: 10.0.0.10, vllm_service_tensor_parallel_size: 4}\n"
    hosts = "all:\n  children:\n    gpu_hosts:\n      hosts:\n"
    return write(
        tmp_path,
        hosts + textwrap.indent(one_gpu + two_gpus + four_gpus, "  "),
        f"""
        servekit_model_id: Qwen/Qwen3-8B
        servekit_model_revision: v1.0.2
        servekit_model_endpoint: http://mirror.lan:8090/
        vllm_service_image: {IMAGE}
        vllm_service_shm_size: 8g
        vllm_service_api_key: {SECRET}
        servekit_k8s_storage_class: nfs-rwx
        """,
    )


def test_ten_hosts_with_mixed_tensor_parallel_sizes_install_and_work(tmp_path):
    proc = cli("--inventory", str(ten_host_inventory(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout
    data = yaml.safe_load(proc.stdout)
    chart = install(data)  # merged over the chart's defaults, valid for its schema
    pods = engine_pods(chart)

    # One values file serves the mixed sizes: one spec per size, each pod its size in GPUs.
    assert [
        (
            p.spec["name"],
            p.spec["replicaCount"],
            p.spec["requestGPU"],
            p.spec["vllmConfig"]["tensorParallelSize"],
        )
        for p in pods
    ] == [("qwen3-8b", 6, 1, 1), ("qwen3-8b-2", 3, 2, 2), ("qwen3-8b-3", 1, 4, 4)]
    assert {p.spec["vllmConfig"]["extraArgs"][1] for p in pods} == {"Qwen3-8B"}

    # Storage: all ten pods, on any node, mount one ReadWriteMany claim of the given class.
    (claim,) = claims(chart).values()
    assert (claim.pods, claim.access_modes, claim.storage_class) == (
        10,
        ("ReadWriteMany",),
        "nfs-rwx",
    )
    for pod in pods:
        # vLLM downloads with ModelScope: its cache, not only HF_HOME, lies on that claim.
        assert on_claim(pod.env["MODELSCOPE_CACHE"], pod) == claim.name
        assert on_claim(pod.env["HF_HOME"], pod) == claim.name
        assert pod.env["VLLM_USE_MODELSCOPE"] == "True"
        assert pod.env["MODELSCOPE_ENDPOINT"] == "http://mirror.lan:8090"
        # Docker's 8g is 8 GiB: a quantity Kubernetes reads the same way.
        assert pod.shm_size_limit == "8Gi"
        assert QUANTITY.match(pod.shm_size_limit)
        assert pod.runtime_class == "nvidia"
        assert f"{pod.spec['repository']}:{pod.spec['tag']}" == IMAGE

    # Updates replace a pod, never add one: no GPU has to be free.
    assert engine_strategy(chart)["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    # A first start downloads, then starts within the hosts' budget: the probe waits for both.
    startup = chart["servingEngineSpec"]["startupProbe"]
    budget = START_TIMEOUT + DEFAULT_DOWNLOAD_ALLOWANCE
    assert budget <= probe_window(startup) < budget + startup["periodSeconds"] + 15
    assert startup["httpGet"] == {"path": "/health", "port": 8000}
    # The key: a reference the chart reads from an existing Secret, for pods and router.
    api_key = chart["servingEngineSpec"]["vllmApiKey"]
    assert api_key == {"secretName": "servekit-vllm-api-key", "secretKey": "api-key"}


def test_what_the_chart_defaults_would_do():
    # The checks above can fail: the chart's own defaults fail them.
    chart = install({})
    example = dict(chart["servingEngineSpec"]["modelSpec"][0], enabled=True, replicaCount=3)
    chart = helm_merge(chart, {"servingEngineSpec": {"modelSpec": [example]}})
    (pod,) = engine_pods(chart)
    (claim,) = claims(chart).values()
    assert claim.pods == 3 and claim.access_modes == ("ReadWriteOnce",)
    assert on_claim("/root/.cache/modelscope", pod) is None
    assert not QUANTITY.match("8g")
    assert engine_strategy(chart)["rollingUpdate"]["maxSurge"] != 0
    assert probe_window(chart["servingEngineSpec"]["startupProbe"]) < START_TIMEOUT


def host_values(**hosts: dict) -> dict:
    """`values` for inventory variables given here (no lock, the image set)."""
    return {name: {"vllm_service_image": IMAGE, **hv} for name, hv in hosts.items()}


def test_one_host_needs_no_shared_storage_class():
    data = values(host_values(g1={}))
    chart = install(data)
    (pod,) = engine_pods(chart)
    (claim,) = claims(chart).values()
    # One pod: a ReadWriteOnce claim of the cluster's default class does.
    assert (claim.pods, claim.access_modes, claim.storage_class) == (1, ("ReadWriteOnce",), None)
    assert on_claim(pod.env["MODELSCOPE_CACHE"], pod) == claim.name
    assert "MODELSCOPE_ENDPOINT" not in pod.env
    assert pod.runtime_class == "nvidia"
    assert pod.shm_size_limit == "16Gi"
    # No key on the hosts: the chart's empty reference, which sets no VLLM_API_KEY.
    assert "vllmApiKey" not in data["servingEngineSpec"]
    assert chart["servingEngineSpec"]["vllmApiKey"] == {"secretName": "", "secretKey": ""}


def test_cpu_hosts_get_neither_gpus_nor_the_gpu_runtime_class():
    data = values(host_values(c1={"vllm_service_accelerator": "cpu"}, g1={}), storage_class="nfs")
    cpu, gpu = engine_pods(install(data))
    assert (cpu.runtime_class, cpu.spec["requestGPU"]) == (None, 0)
    assert (gpu.runtime_class, gpu.spec["requestGPU"]) == ("nvidia", 1)


def test_replicas_need_a_storage_class_given_once():
    with pytest.raises(K8sValuesError, match=r"2 replicas .* servekit_k8s_storage_class"):
        values(host_values(g1={}, g2={}))
    differing = host_values(
        g1={"servekit_k8s_storage_class": "nfs"}, g2={"servekit_k8s_storage_class": "ceph"}
    )
    with pytest.raises(
        K8sValuesError,
        match=r"servekit_k8s_storage_class differs between hosts \(g1: 'nfs', g2: 'ceph'\)",
    ):
        values(differing)
    # The command line's class wins over the inventory's.
    data = values(differing, storage_class="cephfs")
    (claim,) = claims(install(data)).values()
    assert (claim.pods, claim.access_modes, claim.storage_class) == (
        2,
        ("ReadWriteMany",),
        "cephfs",
    )


@pytest.mark.parametrize(
    "docker_size, quantity",
    [
        ("8g", "8Gi"),
        ("16G", "16Gi"),
        ("512m", "512Mi"),
        ("64k", "64Ki"),
        ("100b", "100"),
        ("1048576", "1048576"),
    ],
)
def test_shm_size_in_dockers_syntax_becomes_a_quantity(docker_size, quantity):
    data = values(host_values(g1={"vllm_service_shm_size": docker_size}))
    (pod,) = engine_pods(install(data))
    assert pod.shm_size_limit == quantity
    assert QUANTITY.match(quantity)


@pytest.mark.parametrize("bad", ["8GB", "1.5g", "8Gi", "0", "8 g", "-1g"])
def test_shm_size_that_cannot_be_converted_is_refused(bad):
    with pytest.raises(K8sValuesError) as error:
        values(host_values(g1={"vllm_service_shm_size": bad}))
    message = str(error.value)
    assert f"vllm_service_shm_size={bad!r} of g1" in message
    assert '"8g", which becomes 8Gi' in message


def test_startup_probe_covers_the_slowest_start_plus_the_download():
    hosts = host_values(g1={}, g2={"vllm_service_start_timeout": 1500})
    probe = values(hosts, storage_class="nfs")["servingEngineSpec"]["startupProbe"]
    assert probe_window(probe) >= 1500 + DEFAULT_DOWNLOAD_ALLOWANCE
    for allowance in ("600", 600):
        hosts = host_values(g1={"servekit_k8s_download_allowance": allowance})
        probe = values(hosts)["servingEngineSpec"]["startupProbe"]
        assert 900 + 600 <= probe_window(probe) < 900 + 600 + probe["periodSeconds"] + 15
    probe = values(hosts, download_allowance=0)["servingEngineSpec"]["startupProbe"]
    assert 900 <= probe_window(probe) < 900 + probe["periodSeconds"] + 15
    with pytest.raises(K8sValuesError, match="servekit_k8s_download_allowance='soon' of g1"):
        values(host_values(g1={"servekit_k8s_download_allowance": "soon"}))


def test_liveness_probe_is_the_hosts_health_timer():
    chart = install(values(host_values(g1={"vllm_service_health_failures": 5})))
    live = chart["servingEngineSpec"]["livenessProbe"]
    assert (live["periodSeconds"], live["timeoutSeconds"], live["failureThreshold"]) == (7, 4, 5)
    assert live["httpGet"]["path"] == "/health"


def test_helm_merge_is_helms():
    merged = helm_merge(
        {"a": {"b": 1, "c": [1, 2]}, "d": 1, "e": {"f": 1}},
        {"a": {"c": [3]}, "d": None, "e": {"g": 2}},
    )
    assert merged == {"a": {"b": 1, "c": [3]}, "e": {"f": 1, "g": 2}}
    assert chart_defaults()["servingEngineSpec"]["runtimeClassName"] == "nvidia"

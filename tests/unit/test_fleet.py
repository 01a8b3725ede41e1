"""The fleet without Docker: gateway hosts in `make verify` (their probe targets, their own host
checks), and the sandbox's fleet mode (ports, container settings, the generated inventory,
read back by the real `ansible-inventory` with the sandbox's group variables).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from servekit import inventory as inventory_module
from servekit import verify
from servekit.inventory import API_KEY_ENV, ProbeTarget, gateway_targets, load_hostvars
from servekit.probe import PROBE_NAMES, ProbeRun
from servekit.sandbox import fleet, state
from servekit.sandbox.hosts import gateway_run_kwargs, host_run_kwargs
from servekit.sandbox.state import SandboxHost, SandboxState
from servekit.verify import run

ROOT = Path(__file__).resolve().parents[2]
NO_METRICS = tuple(n for n in PROBE_NAMES if n != "metrics")


def write_inventory(tmp_path: Path, hosts_yml: str, gateway_vars: str = "") -> Path:
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "hosts.yml").write_text(textwrap.dedent(hosts_yml))
    if gateway_vars:
        (tmp_path / "group_vars" / "gateway.yml").write_text(textwrap.dedent(gateway_vars))
    return tmp_path / "hosts.yml"


# ---------------------------------------------------------------------- gateway probe targets


@pytest.fixture
def fleet_inventory(tmp_path) -> Path:
    return write_inventory(
        tmp_path,
        """
        all:
          children:
            gpu_hosts:
              vars:
                vllm_service_served_model_name: Qwen3-8B
                vllm_service_max_model_len: 4096
                vllm_service_api_key: sk-backend
              hosts:
                gpu-01: {ansible_host: 10.0.0.1}
                gpu-02: {ansible_host: 10.0.0.2}
            gateway:
              hosts:
                lb-01: {ansible_host: 10.0.0.5}
                lb-02:
                  ansible_host: 10.0.0.6
                  gateway_bind_address: 10.1.0.6
                  gateway_port: 9000
                  gateway_api_key: "{{ vault_gateway_api_key }}"
                  gateway_expose_metrics: true
                lb-03:
                  servekit_probe_url: "http://{{ ansible_host }}:8443"
                  ansible_host: 10.0.0.7
                  gateway_api_key: sk-edge
        """,
    )


def test_gateway_targets_probe_the_endpoint_with_the_backends_model(fleet_inventory):
    one, two, three = gateway_targets(fleet_inventory, env={})
    assert one == ProbeTarget(
        "lb-01",
        "http://10.0.0.5:8000",
        "Qwen3-8B",
        "sk-backend",  # no key at the edge: the backends' key goes through
        4096,
        "qwen3",
        "inventory",
        checks=NO_METRICS,  # /metrics is refused at the gateway
        kind="gateway",
    )
    assert two.url == "http://10.1.0.6:9000"
    assert (two.api_key, two.api_key_source, two.checks) == (None, "unresolved", None)
    assert (three.url, three.api_key, three.api_key_source) == (
        "http://10.0.0.7:8443",
        "sk-edge",
        "inventory",
    )
    with_env = gateway_targets(fleet_inventory, env={API_KEY_ENV: "sk-vault"})
    assert (with_env[1].api_key, with_env[1].api_key_source) == ("sk-vault", "env")
    assert gateway_targets(fleet_inventory, group="missing", env={}) == []


def test_the_example_inventory_has_a_gateway_with_the_fleets_key(tmp_path):
    (lb,) = gateway_targets(ROOT / "inventory" / "example" / "hosts.yml", env={})
    assert (lb.host, lb.url, lb.kind) == ("lb-01", "http://10.20.0.5:8000", "gateway")
    assert lb.api_key_source == "unresolved"  # a vault value: SERVEKIT_API_KEY gives it
    assert "metrics" not in (lb.checks or ())
    hv = load_hostvars(ROOT / "inventory" / "example" / "hosts.yml")
    assert hv["gpu-02"]["vllm_service_tensor_parallel_size"] == 2
    assert "vllm_service_tensor_parallel_size" not in hv["gpu-01"]


def test_probe_all_keeps_gateway_and_host_probe_sets_apart(monkeypatch):
    calls = []

    def fake_probe_targets(pairs, model, checks=None, **kwargs):
        calls.append((tuple(name for name, _ in pairs), checks))
        return [ProbeRun(name, url, model=model) for name, url in pairs]

    monkeypatch.setattr(run, "probe_targets", fake_probe_targets)
    targets = [
        ProbeTarget("gpu-01", "http://a:8000", "Qwen3-8B", None, 8192, "qwen3"),
        ProbeTarget("lb-01", "http://l:8000", "Qwen3-8B", None, 8192, "qwen3", checks=NO_METRICS),
        ProbeTarget("gpu-02", "http://b:8000", "Qwen3-8B", None, 8192, "qwen3"),
    ]
    runs = verify.probe_all(targets)
    assert [r.target for r in runs] == ["gpu-01", "lb-01", "gpu-02"]
    assert sorted(calls) == [(("gpu-01", "gpu-02"), None), (("lb-01",), NO_METRICS)]


def test_verify_checks_gateway_hosts_with_their_own_checks_and_probes_them(monkeypatch, tmp_path):
    seen: dict = {}
    data = {"gpu_hosts": {"hosts": ["gpu-01"]}, "gateway": {"hosts": ["lb-01"]}}
    monkeypatch.setattr(inventory_module, "load_inventory", lambda path: data)

    def fake_check_hosts(hosts, inventory, report_dir, jobs, tests_for=None, deep=False):
        seen["hosts"], seen["tests_for"] = list(hosts), dict(tests_for or {})
        return [verify.HostChecks(h, 0, [verify.HostTest("t.py::t", "PASS", 0.1)]) for h in hosts]

    lb = ProbeTarget("lb-01", "http://l:8000", "Qwen3-8B", None, 8192, "qwen3", kind="gateway")
    monkeypatch.setattr(run, "check_hosts", fake_check_hosts)
    monkeypatch.setattr(run, "inventory_targets", lambda inv, group: [])
    monkeypatch.setattr(run, "gateway_targets", lambda inv, group, backends: [lb])
    monkeypatch.setattr(
        run, "probe_all", lambda targets, timeout: [ProbeRun(t.host, t.url) for t in targets]
    )
    result = verify.run_verify(Path("inv.yml"), tmp_path)
    assert seen["hosts"] == ["gpu-01", "lb-01"]
    assert seen["tests_for"] == {"lb-01": verify.GATEWAY_CHECKS}
    assert [r.target for r in result.runs] == ["lb-01"]
    report = json.loads((tmp_path / "verify.json").read_text())
    assert set(report["hosts"]) == {"gpu-01", "lb-01"}
    verify.run_verify(Path("inv.yml"), tmp_path, gateway_group=None)
    assert seen["hosts"] == ["gpu-01"]


def test_gateway_host_checks_are_their_own_module():
    files = run._test_files(verify.GATEWAY_CHECKS)
    assert [Path(f).name for f in files] == ["test_gateway.py"]
    assert all("gateway" not in Path(f).parent.name for f in run._test_files(verify.HOST_CHECKS))


# ---------------------------------------------------------------------- sandbox fleet mode


def test_hosts_keep_their_ports_in_a_fleet_and_the_gateway_takes_8080():
    """A single host becomes a fleet's first host as it is: no port of it moves."""
    assert (state.ssh_port(1), fleet.api_port(1)) == (2222, 8000)
    assert [fleet.api_port(n) for n in (1, 2, 3)] == [8000, 8001, 8002]
    kw = host_run_kwargs(2, "172.17.0.1")
    assert kw["ports"] == {"22/tcp": ("127.0.0.1", 2223), "8000/tcp": ("127.0.0.1", 8001)}
    assert host_run_kwargs(1, "172.17.0.1")["ports"]["8000/tcp"] == ("127.0.0.1", 8000)
    gw = gateway_run_kwargs("172.17.0.1")
    assert gw["name"] == "servekit-gateway" and gw["hostname"] == "sandbox-gateway"
    assert gw["ports"] == {"22/tcp": ("127.0.0.1", 2221), "8000/tcp": ("127.0.0.1", 8080)}
    assert gw["labels"] == {"servekit.role": "sandbox-gateway"}  # not a sandbox host
    assert "/var/lib/docker" not in json.dumps(gw["volumes"])  # no nested Docker
    for bad in ((0, True), (-1, False)):
        with pytest.raises(ValueError):
            fleet.check_request(*bad)


def hosts_and_gateway() -> tuple[list[SandboxHost], SandboxHost]:
    hosts = [
        SandboxHost(
            n,
            state.host_container(n),
            state.host_hostname(n),
            f"id{n}",
            "127.0.0.1",
            state.ssh_port(n),
            fleet.api_port(n),
            state.host_volume(n),
            address=f"172.17.0.{n + 2}",
        )
        for n in (1, 2, 3)
    ]
    gateway = SandboxHost(
        0, "servekit-gateway", "sandbox-gateway", "gw", "127.0.0.1", 2221, 8080, "", "172.17.0.9"
    )
    return hosts, gateway


def test_fleet_inventory_reads_back_with_the_sandbox_group_vars(tmp_path):
    hosts, gateway = hosts_and_gateway()
    inventory = fleet.write_inventory(tmp_path / "inventory", hosts, gateway, ROOT)
    assert (tmp_path / "inventory" / "group_vars").resolve() == (
        ROOT / "inventory" / "sandbox" / "group_vars"
    )
    out = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-inventory")), "-i", str(inventory), "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    assert data["gpu_hosts"]["hosts"] == ["sandbox-1", "sandbox-2", "sandbox-3"]
    assert data["gateway"]["hosts"] == ["sandbox-gateway"]
    hv = data["_meta"]["hostvars"]
    assert hv["sandbox-2"]["ansible_port"] == 2223
    assert hv["sandbox-2"]["servekit_probe_url"] == "http://127.0.0.1:8001"
    assert hv["sandbox-2"]["servekit_gateway_backend_address"] == "172.17.0.4"
    assert hv["sandbox-2"]["servekit_accelerator"] == "cpu"  # the sandbox's group vars
    gw = hv["sandbox-gateway"]
    assert (gw["ansible_port"], gw["servekit_probe_url"]) == (2221, "http://127.0.0.1:8080")
    assert gw["ansible_user"] == "root" and gw["gateway_allow_unauthenticated"] is True
    # Rewriting is idempotent; single-host mode removes it all.
    assert fleet.write_inventory(tmp_path / "inventory", hosts, gateway, ROOT) == inventory
    fleet.remove_inventory(tmp_path / "inventory")
    assert not (tmp_path / "inventory").exists()


def test_verify_targets_of_the_sandbox_fleet(tmp_path):
    hosts, gateway = hosts_and_gateway()
    inventory = fleet.write_inventory(tmp_path / "inventory", hosts, gateway, ROOT)
    (lb,) = gateway_targets(inventory, env={})
    assert (lb.host, lb.url, lb.api_key_source) == (
        "sandbox-gateway",
        "http://127.0.0.1:8080",
        "none",
    )


def test_a_host_without_a_bridge_address_is_refused():
    hosts, gateway = hosts_and_gateway()
    hosts[1].address = ""
    with pytest.raises(ValueError, match="servekit-sandbox-2 has no address"):
        fleet.inventory(hosts, gateway)


def test_state_with_a_gateway_round_trips_and_old_state_still_loads():
    hosts, gateway = hosts_and_gateway()
    state = SandboxState(
        hosts=hosts,
        ssh_user="root",
        ssh_key="k",
        known_hosts="kh",
        gateway="172.17.0.1",
        control_hostname="servekit-control",
        registry={},
        mirror={},
        images={},
        vllm_image="img",
        gateway_host=gateway,
        inventory=".sandbox/inventory/hosts.yml",
    )
    again = SandboxState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    old = state.to_dict()
    for key in ("gateway_host", "inventory"):
        old.pop(key)
    for h in old["hosts"]:
        h.pop("address")
    loaded = SandboxState.from_dict(old)
    assert loaded.gateway_host is None and loaded.hosts[0].address == ""

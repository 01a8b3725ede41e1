"""`servekit verify` without a deployment: inventory parsing (real `ansible-inventory` on temp
inventories), host checks run in parallel (real pytest-testinfra processes on local hosts),
JUnit parsing and merging, probe grouping, the verify.json report, and the helpers the host
checks use to read the vLLM unit (against the unit the role renders).
"""

from __future__ import annotations

import json
import textwrap
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from servekit import inventory as inventory_module
from servekit.images import vllm_version
from servekit.images.registry import parse_reference
from servekit.inventory import (
    API_KEY_ENV,
    Inventory,
    ProbeTarget,
    group_hosts,
    is_unresolved,
    probe_targets,
)
from servekit.probe import ProbeResult, ProbeRun
from servekit.verify import (
    HostChecks,
    HostTest,
    VerifyResult,
    check_hosts,
    host_checks_as_runs,
    host_checks_rc,
    host_facts,
    parse_junit,
    probe_all,
    run,
    to_verify_json,
    write_verify_json,
)

ROOT = Path(__file__).resolve().parents[2]


def write_inventory(tmp_path: Path, hosts_yml: str, group_vars: str = "") -> Path:
    inv = tmp_path / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "hosts.yml").write_text(textwrap.dedent(hosts_yml))
    if group_vars:
        (inv / "group_vars" / "gpu_hosts.yml").write_text(textwrap.dedent(group_vars))
    return inv / "hosts.yml"


# A vault value as `ansible-vault encrypt_string` writes it (ansible-inventory does not
# decrypt it without a vault password; it passes it on as {"__ansible_vault": ...}).
VAULT_VALUE = """!vault |
          $ANSIBLE_VAULT;1.1;AES256
          63363765343734383533333534646337306565396332386335613864333761383536303435333063
          3533333863363165386434376639656161366164386365390a376136633963346432643439323536
          35616631386134313466343030353966363865643138343062323331353832303937363432353832
          3463366665613766370a653838646263613866373735386437353161626264636533363933356334
          3864"""


@pytest.fixture
def fleet(tmp_path) -> Path:
    return write_inventory(
        tmp_path,
        """
        all:
          children:
            gpu_hosts:
              children:
                rack_a:
                  hosts:
                    gpu-01: {ansible_host: 10.0.0.1}
                    gpu-02:
                      ansible_host: 10.0.0.2
                      vllm_service_api_key: plain-key
                      vllm_service_reasoning_parser: ""
                rack_b:
                  hosts:
                    gpu-03:
                      ansible_host: 10.0.0.3
                      vllm_service_bind_address: 10.1.0.3
                      vllm_service_port: 9000
                      vllm_service_api_key: "{{ vault_vllm_service_api_key }}"
                      servekit_probe_url: "http://{{ vllm_service_bind_address }}:{{ port_var }}"
                    gpu-04:
                      ansible_host: 10.0.0.4
                      vllm_service_api_key: ""
            other:
              hosts:
                web-01: {}
        """,
        f"""
        vllm_service_served_model_name: Qwen3-8B
        vllm_service_max_model_len: 4096
        vllm_service_api_key: {VAULT_VALUE}
        servekit_probe_url: "http://{{{{ ansible_host }}}}:8000"
        """,
    )


def test_inventory_targets_resolve_what_they_can(fleet):
    targets = {t.host: t for t in probe_targets(fleet, env={})}
    assert list(targets) == ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]  # child groups, in order
    one, two, three, four = targets.values()
    # a simple reference to a plain variable is resolved
    assert one.url == "http://10.0.0.1:8000"
    assert (one.model, one.max_model_len, one.reasoning_parser) == ("Qwen3-8B", 4096, "qwen3")
    # the group's vault value is unknown here, and no SERVEKIT_API_KEY is set
    assert (one.api_key, one.api_key_source) == (None, "unresolved")
    # a plain host value wins over the group's; "" means no reasoning parser
    assert (two.api_key, two.api_key_source) == ("plain-key", "inventory")
    assert two.reasoning_parser is None
    # a URL that stays a template falls back to the bind address and port
    assert three.url == "http://10.1.0.3:9000"
    assert (three.api_key, three.api_key_source) == (None, "unresolved")
    # an empty key means the server has none
    assert (four.api_key, four.api_key_source) == (None, "none")


def test_inventory_api_key_comes_from_the_environment_for_templates_and_vault(fleet):
    env = {API_KEY_ENV: "sk-from-env"}
    targets = {t.host: t for t in probe_targets(fleet, env=env)}
    assert (targets["gpu-01"].api_key, targets["gpu-01"].api_key_source) == ("sk-from-env", "env")
    assert (targets["gpu-03"].api_key, targets["gpu-03"].api_key_source) == ("sk-from-env", "env")
    assert targets["gpu-02"].api_key == "plain-key"  # a plain value is not overridden
    assert (targets["gpu-04"].api_key, targets["gpu-04"].api_key_source) == (None, "none")


def test_inventory_without_a_key_takes_the_environments(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  children:\n    gpu_hosts:\n      hosts:\n        gpu-09: {}\n")
    (target,) = probe_targets(inventory, env={API_KEY_ENV: "sk-given-at-deploy"})
    assert (target.api_key, target.api_key_source) == ("sk-given-at-deploy", "env")
    (target,) = probe_targets(inventory, env={})
    assert (target.api_key, target.api_key_source) == (None, "none")


def test_inventory_group_hosts_and_the_shipped_inventories(fleet):
    assert group_hosts(fleet, "other") == ["web-01"]
    assert group_hosts(fleet, "missing") == []
    (sandbox,) = probe_targets(ROOT / "inventory" / "sandbox" / "hosts.yml", env={})
    assert sandbox == ProbeTarget(
        "sandbox-1", "http://127.0.0.1:8000", "Qwen3-8B", None, 8192, "qwen3", "none"
    )
    example = probe_targets(ROOT / "inventory" / "example" / "hosts.yml", env={})
    assert [(t.host, t.url, t.api_key_source) for t in example] == [
        ("gpu-01", "http://10.20.0.11:8000", "unresolved"),
        ("gpu-02", "http://10.20.0.12:8000", "unresolved"),
    ]


def test_is_unresolved():
    assert is_unresolved("{{ x }}") and is_unresolved("{% if x %}y{% endif %}")
    assert is_unresolved({"__ansible_vault": "$ANSIBLE_VAULT;1.1;AES256\n00"})
    assert is_unresolved("$ANSIBLE_VAULT;1.1;AES256\n00")
    assert not is_unresolved("sk-123") and not is_unresolved(8000) and not is_unresolved(None)


# ---------------------------------------------------------------------- host checks, for real

HOST_TESTS = """
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def name(host):
    return host.ansible.get_variables()["inventory_hostname"]


@pytest.fixture(scope="module")
def broken(name):
    assert name != "web-2", f"expected a working fixture on {name}, got a broken one"


def test_reaches_the_host(host, name):
    # A barrier across the hosts' processes: each says it has arrived, then waits for all
    # the others. Checks run one host after another would never meet here.
    variables = host.ansible.get_variables()
    stamps, everyone = Path(variables["stamps"]), variables["groups"]["gpu_hosts"]
    (stamps / f"{name}.arrived").touch()
    deadline = time.monotonic() + 60
    while not all((stamps / f"{h}.arrived").exists() for h in everyone):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    met = all((stamps / f"{h}.arrived").exists() for h in everyone)
    (stamps / name).write_text("met" if met else "alone")
    assert host.run("true").rc == 0


def test_role(host, name):
    role = host.ansible.get_variables()["role"]
    assert role == "web", f"expected role web on {name}, got {role}"


def test_gpu(host):
    pytest.skip("not a GPU host")


def test_fixture(broken):
    pass
"""


@pytest.fixture
def local_fleet(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "stamps").mkdir()
    inventory = write_inventory(
        tmp_path,
        f"""
        all:
          vars:
            stamps: {tmp_path / "stamps"}
          children:
            gpu_hosts:
              hosts:
                web-1: {{ansible_connection: local, role: web}}
                web-2: {{ansible_connection: local, role: db}}
        """,
    )
    tests = tmp_path / "checks"
    tests.mkdir()
    (tests / "test_checks.py").write_text(HOST_TESTS)
    return inventory, tests


def test_host_checks_run_per_host_in_parallel_and_report_each(local_fleet, tmp_path, capsys):
    inventory, tests = local_fleet
    reports = tmp_path / "reports"
    results = check_hosts(["web-1", "web-2"], inventory, reports, tests=tests, cwd=tmp_path)
    one, two = results
    assert [one.host, two.host] == ["web-1", "web-2"]
    # the two hosts' checks ran at the same time: each found the other at the barrier
    met = {h: (tmp_path / "stamps" / h).read_text() for h in ("web-1", "web-2")}
    assert met == {"web-1": "met", "web-2": "met"}

    assert one.ok and one.rc == 0
    assert [(t.name, t.status) for t in one.tests] == [
        ("test_checks.py::test_reaches_the_host", "PASS"),
        ("test_checks.py::test_role", "PASS"),
        ("test_checks.py::test_gpu", "SKIP"),
        ("test_checks.py::test_fixture", "PASS"),
    ]
    assert one.counts == {"PASS": 3, "FAIL": 0, "SKIP": 1}
    assert one.tests[2].detail == "not a GPU host"

    assert not two.ok and two.rc == 1
    by_name = {t.name.split("::")[1]: t for t in two.tests}
    assert by_name["test_role"].status == "FAIL"
    assert by_name["test_role"].detail == "expected role web on web-2, got db"
    assert by_name["test_fixture"].status == "FAIL"
    assert by_name["test_fixture"].detail == (
        "error in setup: expected a working fixture on web-2, got a broken one"
    )
    assert "test_role" in two.output  # pytest's own output is kept for the log
    assert host_checks_rc(results) == 1
    out = capsys.readouterr().out
    assert "web-1: ok (3 passed, 0 failed, 1 skipped" in out
    assert "web-2: FAILED (1 passed, 2 failed, 1 skipped; pytest exit 1)" in out

    merged = ET.parse(reports / "hosts.junit.xml").getroot()
    assert merged.tag == "testsuites"
    assert [s.get("name") for s in merged.findall("testsuite")] == ["web-1", "web-2"]
    assert (merged.get("tests"), merged.get("failures"), merged.get("errors")) == ("8", "1", "1")
    assert merged.get("skipped") == "2"
    props = merged.find("testsuite/properties")
    assert props is not None
    assert {p.get("name"): p.get("value") for p in props} == {"host": "web-1"}


def test_a_host_whose_checks_cannot_run_is_reported_with_the_output(local_fleet, tmp_path):
    inventory, tests = local_fleet
    (tests / "test_checks.py").write_text("import no_such_module\n")
    reports = tmp_path / "reports"
    (result,) = check_hosts(["web-1"], inventory, reports, tests=tests, cwd=tmp_path)
    assert not result.ok and result.rc != 0
    merged = ET.parse(reports / "hosts.junit.xml").getroot()
    assert merged.get("errors") == "1"
    (run,) = host_checks_as_runs([result])
    assert run.results and run.results[0].failed
    assert "no_such_module" in json.dumps([r.detail for r in run.results])


def test_no_hosts_is_a_failure(tmp_path):
    assert check_hosts([], tmp_path / "none.yml", tmp_path) == []
    assert host_checks_rc([]) == 5
    assert ET.parse(tmp_path / "hosts.junit.xml").getroot().get("tests") == "0"


def test_the_shipped_model_check_hashes_the_files_only_when_deep(tmp_path):
    """test_host.py's manifest check, run by pytest-testinfra on this machine: sizes always,
    the SHA-256 of every byte with --deep (a same-size change is caught only then)."""
    import hashlib
    import subprocess
    import sys

    model = tmp_path / "models" / "test" / "m"
    (model / "v1" / "sub").mkdir(parents=True)
    (model / "current").symlink_to("v1")
    files = {"config.json": b'{"a": 1}', "sub/w.bin": bytes(range(256)) * 64}
    for rel, data in files.items():
        (model / "v1" / rel).write_bytes(data)
    manifest = {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for rel, data in files.items()
    }
    (model / "v1" / ".servekit-manifest.json").write_text(json.dumps({"files": manifest}))
    inventory = write_inventory(
        tmp_path,
        f"""
        all:
          children:
            gpu_hosts:
              hosts:
                m-1:
                  ansible_connection: local
                  servekit_model_root: {tmp_path / "models"}
                  servekit_model_id: test/m
        """,
    )

    def check(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                str(run.HOST_CHECKS / "test_host.py"),
                "-k",
                "test_model_matches_its_manifest",
                "--hosts=ansible://m-1",
                f"--ansible-inventory={inventory}",
                "-p",
                "no:cacheprovider",
                "-q",
                "-s",
                *extra,
            ],
            cwd=ROOT,
            env=run._pytest_env(),
            capture_output=True,
            text=True,
            check=False,
        )

    deep = check("--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr
    assert "report: 2 files, SHA-256 of every byte matches the manifest" in deep.stdout
    (model / "v1" / "sub" / "w.bin").write_bytes(b"\xff" + files["sub/w.bin"][1:])
    quick = check()  # the size is the same
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert "report: 2 files, sizes checked" in quick.stdout
    corrupt = check("--deep")
    assert corrupt.returncode == 1
    assert "sub/w.bin: expected " + manifest["sub/w.bin"]["sha256"] in corrupt.stdout


# ---------------------------------------------------------------------- JUnit parsing

PYTEST_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="1"
 tests="5" time="3.1" hostname="ctl">
<testcase classname="src.servekit.verify.host_checks.test_host"
 name="test_docker_is_active_and_enabled[ansible://gpu-01]" time="0.120" />
<testcase classname="src.servekit.verify.host_checks.test_host"
 name="test_env_file_is_private[ansible://gpu-01]" time="0.050">
 <failure message="AssertionError: expected /etc/vllm/vllm.env mode 0o600, got 0o644&#10;assert 4"
 >long traceback</failure></testcase>
<testcase classname="src.servekit.verify.host_checks.test_gpu"
 name="test_driver_version_is_pinned[ansible://gpu-01]" time="0.001">
 <skipped type="pytest.skip" message="servekit_accelerator is 'cpu': not a GPU host"
 >test_gpu.py:88: servekit_accelerator is 'cpu'</skipped></testcase>
<testcase classname="src.servekit.verify.host_checks.test_host"
 name="test_teardown_breaks[ansible://gpu-01]" time="0.300" />
<testcase classname="src.servekit.verify.host_checks.test_host"
 name="test_teardown_breaks[ansible://gpu-01]" time="0.010">
 <error message="failed on teardown with &quot;Failed: cleanup broke&quot;">tb</error></testcase>
<testcase classname="src.servekit.verify.host_checks.test_host"
 name="test_param[ansible://gpu-01-a]"
 time="0.010" />
</testsuite></testsuites>
"""


def test_parse_junit_statuses_messages_and_names():
    tests = parse_junit(PYTEST_JUNIT, host="gpu-01")
    assert [(t.name, t.status, t.detail) for t in tests] == [
        ("test_host.py::test_docker_is_active_and_enabled", "PASS", ""),
        (
            "test_host.py::test_env_file_is_private",
            "FAIL",
            "expected /etc/vllm/vllm.env mode 0o600, got 0o644",
        ),
        (
            "test_gpu.py::test_driver_version_is_pinned",
            "SKIP",
            "servekit_accelerator is 'cpu': not a GPU host",
        ),
        ("test_host.py::test_teardown_breaks", "FAIL", "error in teardown: cleanup broke"),
        ("test_host.py::test_param[a]", "PASS", ""),
    ]
    assert tests[3].seconds == pytest.approx(0.31)
    # without the host, the whole id goes
    assert parse_junit(PYTEST_JUNIT)[-1].name == "test_host.py::test_param"


def test_a_passing_check_reports_its_printed_report_lines():
    xml = (
        '<testsuites><testsuite name="pytest"><testcase classname="test_monitoring" '
        'name="test_prometheus_scrapes_every_target[ansible://mon-1]" time="0.5">'
        "<system-out>noise\nreport: vllm gpu-1 http://10.0.0.5:8000/metrics up, node gpu-1 "
        "http://10.0.0.5:9100/metrics up\n</system-out></testcase>"
        '<testcase classname="test_host" name="test_quiet[ansible://mon-1]" time="0.1">'
        "<system-out>just noise</system-out></testcase></testsuite></testsuites>"
    )
    reported, quiet = parse_junit(xml, host="mon-1")
    assert reported.status == "PASS"
    assert reported.detail == (
        "vllm gpu-1 http://10.0.0.5:8000/metrics up, node gpu-1 http://10.0.0.5:9100/metrics up"
    )
    assert (quiet.status, quiet.detail) == ("PASS", "")


def test_parse_junit_reads_a_file(tmp_path):
    path = tmp_path / "h.xml"
    path.write_text(PYTEST_JUNIT)
    assert len(parse_junit(path, "gpu-01")) == 5


# ---------------------------------------------------------------------- probes, grouped


def test_probe_all_groups_targets_that_agree_and_keeps_the_order(monkeypatch):
    calls: list[tuple[list, str | None, str]] = []
    threads: set[int] = set()
    lock = threading.Lock()
    # Each group's call waits here for the other: calls made one after the other never meet.
    both = threading.Barrier(2, timeout=10)
    met: list[bool] = []

    def fake_probe_targets(pairs, model, api_key=None, **kwargs):
        with lock:
            calls.append((pairs, api_key, model))
            threads.add(threading.get_ident())
        try:
            both.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return [ProbeRun(name, url, model=model) for name, url in pairs]

    monkeypatch.setattr(run, "probe_targets", fake_probe_targets)
    targets = [
        ProbeTarget("a", "http://a:8000", "Qwen3-8B", "k1", 8192, "qwen3"),
        ProbeTarget("b", "http://b:8000", "Qwen3-8B", "k2", 8192, "qwen3"),
        ProbeTarget("c", "http://c:8000", "Qwen3-8B", "k1", 8192, "qwen3"),
    ]
    runs = probe_all(targets)
    assert met == [True, True]  # the two groups ran side by side
    assert [r.target for r in runs] == ["a", "b", "c"]
    assert sorted((tuple(n for n, _ in pairs), key) for pairs, key, _ in calls) == [
        (("a", "c"), "k1"),
        (("b",), "k2"),
    ]
    assert len(threads) == 2
    assert probe_all([]) == []


# ---------------------------------------------------------------------- verify.json


def sample_result() -> VerifyResult:
    good = HostChecks(
        "gpu-01",
        0,
        [
            HostTest("test_host.py::test_docker_is_active_and_enabled", "PASS", 0.1),
            HostTest("test_gpu.py::test_driver_version_is_pinned", "SKIP", 0.0, "not a GPU host"),
        ],
        seconds=4.2,
    )
    bad = HostChecks(
        "gpu-02",
        1,
        [HostTest("test_host.py::test_env_file_is_private", "FAIL", 0.1, "expected 0o600")],
        seconds=3.9,
    )
    runs = [
        ProbeRun(
            "gpu-01",
            "http://10.0.0.1:8000",
            [ProbeResult("health", True, "HTTP 200", 0.01)],
            model="Qwen3-8B",
        ),
        ProbeRun(
            "gpu-02",
            "http://10.0.0.2:8000",
            [ProbeResult("health", True, "HTTP 200", 0.01)],
            model="Qwen3-8B",
        ),
    ]
    return VerifyResult(host_checks_rc([good, bad]), runs, [good, bad])


def test_verify_json_has_host_checks_and_probes_per_host(tmp_path):
    result = sample_result()
    assert not result.ok and result.host_checks_rc == 1
    report = to_verify_json(result, "inventory/site/hosts.yml", "gpu_hosts", "2026-01-01T00:00:00")
    assert report["ok"] is False
    assert (report["hosts_ok"], report["hosts_total"]) == (1, 2)
    assert (report["inventory"], report["group"]) == ("inventory/site/hosts.yml", "gpu_hosts")
    one, two = report["hosts"]["gpu-01"], report["hosts"]["gpu-02"]
    assert one["ok"] is True and two["ok"] is False
    assert one["host_checks"] == {
        "ok": True,
        "rc": 0,
        "seconds": 4.2,
        "counts": {"PASS": 1, "FAIL": 0, "SKIP": 1},
        "tests": [
            {
                "name": "test_host.py::test_docker_is_active_and_enabled",
                "status": "PASS",
                "seconds": 0.1,
                "detail": "",
            },
            {
                "name": "test_gpu.py::test_driver_version_is_pinned",
                "status": "SKIP",
                "seconds": 0.0,
                "detail": "not a GPU host",
            },
        ],
    }
    assert one["probes"]["ok"] is True
    assert one["probes"]["base_url"] == "http://10.0.0.1:8000"
    assert one["probes"]["results"][0]["status"] == "PASS"
    assert two["host_checks"]["tests"][0]["detail"] == "expected 0o600"
    assert two["probes"]["ok"] is True  # probes passed, host checks did not

    path = write_verify_json(result, tmp_path, "inv.yml", "gpu_hosts")
    assert path == tmp_path / "verify.json"
    assert json.loads(path.read_text())["hosts"]["gpu-02"]["host_checks"]["rc"] == 1


def test_verify_json_for_a_host_without_probes_or_checks():
    result = VerifyResult(0, [ProbeRun("only-probed", "http://x", [])], [])
    report = to_verify_json(result)
    assert report["hosts"]["only-probed"]["host_checks"] is None
    assert report["hosts"]["only-probed"]["ok"] is False
    assert report["ok"] is False


def test_host_checks_render_as_a_table_per_host():
    from servekit.probe.report import render_table

    text = render_table(host_checks_as_runs(sample_result().hosts), color=False, width=100)
    assert "gpu-01  host checks" in text
    assert "test_docker_is_active_and_enabled  PASS" in text
    assert "test_driver_version_is_pinned" in text and "SKIP" in text
    assert "gpu-02: FAIL  0 passed, 1 failed, 0 skipped" in text


def test_run_verify_writes_every_report(monkeypatch, tmp_path, capsys):
    result = sample_result()
    data = {"gpu_hosts": {"hosts": ["gpu-01", "gpu-02"]}, "_meta": {"hostvars": {}}}
    monkeypatch.setattr(inventory_module, "load_inventory", lambda path: data)
    monkeypatch.setattr(run, "check_hosts", lambda *a, **k: result.hosts)
    monkeypatch.setattr(run, "probe_all", lambda targets, timeout: result.runs)
    got = run.run_verify(Path("inv.yml"), tmp_path, "gpu_hosts")
    assert not got.ok and got.host_checks_rc == 1
    assert {p.name for p in tmp_path.iterdir()} == {
        "verify.json",
        "probes.json",
        "probes.junit.xml",
    }
    out = capsys.readouterr().out
    assert "==> verify FAILED" in out
    assert "host checks of gpu-02 (pytest output)" in out


def test_run_verify_reads_the_inventory_once(monkeypatch, tmp_path, fleet):
    """Hosts, gateways, probe targets and their backends: one `ansible-inventory --list`."""
    reads: list[Path] = []
    real = inventory_module.load_inventory

    def counted(path):
        reads.append(Path(path))
        return real(path)

    seen: dict = {}

    def fake_check_hosts(hosts, inventory, report_dir, jobs, tests_for=None, deep=False):
        seen.update(hosts=list(hosts), deep=deep)
        return [HostChecks(h, 0, [HostTest("t.py::t", "PASS", 0.1)]) for h in hosts]

    def fake_probe_all(targets, timeout):
        seen["targets"] = [t.host for t in targets]
        return [ProbeRun(t.host, t.url, [ProbeResult("health", True, "", 0.0)]) for t in targets]

    monkeypatch.setattr(inventory_module, "load_inventory", counted)
    monkeypatch.setattr(run, "check_hosts", fake_check_hosts)
    monkeypatch.setattr(run, "probe_all", fake_probe_all)
    got = run.run_verify(fleet, tmp_path, deep=True)
    assert got.ok
    assert reads == [fleet]
    assert seen == {
        "hosts": ["gpu-01", "gpu-02", "gpu-03", "gpu-04"],
        "deep": True,
        "targets": ["gpu-01", "gpu-02", "gpu-03", "gpu-04"],
    }
    # A read answers every question asked of it, without reading again.
    read = Inventory.read(fleet)
    assert read.hosts("other") == ["web-01"]
    assert [t.url for t in probe_targets(read, env={})][:2] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
    ]
    assert reads == [fleet, fleet]


def test_deep_host_checks_get_the_option(tmp_path):
    command = run._pytest_command("h", tmp_path / "inv", tmp_path / "j.xml", tmp_path, deep=True)
    assert command[-1] == "--deep"
    assert "--deep" not in run._pytest_command("h", tmp_path / "inv", tmp_path / "j.xml", tmp_path)


# ---------------------------------------------------------------------- host-check helpers


def render_unit(tmp_path: Path, template: str = "vllm.service.j2", **extra) -> str:
    """A file as the vllm_service role writes it, vllm.service unless ``template`` says
    otherwise (test_vllm_unit's site: a lock beside the inventory holding the pinned release
    at DIGEST)."""
    from test_firewall import render
    from test_vllm_unit import _site

    name = f"site-{len(list(tmp_path.iterdir()))}"
    return render(template, **_site(tmp_path, name, **extra))


def test_the_host_checks_find_the_key_where_the_role_puts_it(tmp_path):
    """The route gate's settings file holds the key; a VLLM_API_KEY in the env file (through
    vllm_service_env) is a key too."""
    key = "k" * 40
    gate_json = render_unit(tmp_path, "gate.json.j2", vllm_service_api_key=key)
    assert host_facts.gate_key(gate_json) == key
    assert host_facts.gate_key(render_unit(tmp_path, "gate.json.j2")) is None
    for bad in ('{"api_key": "' + key, "[]", '{"allowed_routes": []}'):
        with pytest.raises(ValueError) as raised:
            host_facts.gate_key(bad)
        assert key not in str(raised.value)
    env = render_unit(tmp_path, "vllm.env.j2", vllm_service_env={"VLLM_API_KEY": "sk-env"})
    assert host_facts.env_value(env, "VLLM_API_KEY") == "sk-env"
    assert host_facts.env_value(render_unit(tmp_path, "vllm.env.j2"), "VLLM_API_KEY") is None
    vllm_vars = yaml.safe_load((ROOT / "ansible/roles/vllm_service/vars/main.yml").read_text())
    assert vllm_vars["_vllm_service_gate_dir"] == host_facts.GATE_DIR
    assert vllm_vars["_vllm_service_gate_file"].endswith("/gate.json")
    assert f"{host_facts.GATE_DIR}/gate.json" == host_facts.GATE_FILE
    assert vllm_vars["_vllm_service_env_file"] == host_facts.ENV_FILE


SANDBOX_IMAGE = (
    "servekit-control:5000/servekit/vllm-cpu@sha256:"
    "ca2620f09165ef96b8d0550b6d8530e0519bd85955acba5253d5a32fc0a17416"
)


def test_the_unit_image_and_gpu_arguments_are_read_from_exec_start(tmp_path):
    from test_vllm_unit import DIGEST, GPU_REPOSITORY

    sandbox = host_facts.exec_start_args(
        render_unit(
            tmp_path,
            servekit_accelerator="cpu",
            vllm_service_image=SANDBOX_IMAGE,
            vllm_service_bind_address="0.0.0.0",
            vllm_service_extra_args=["--enable-prefix-caching"],
        )
    )
    assert sandbox[:2] == ["/usr/bin/docker", "run"]
    assert host_facts.image_of(sandbox) == SANDBOX_IMAGE
    assert host_facts.gpu_args_of(sandbox) == []
    assert "--ipc=host" in sandbox

    gpu = host_facts.exec_start_args(render_unit(tmp_path, servekit_accelerator="gpu"))
    default_image = f"{GPU_REPOSITORY}:v{vllm_version(ROOT)}@{DIGEST}"
    assert host_facts.image_of(gpu) == default_image
    assert host_facts.gpu_args_of(gpu) == ["--gpus", "all"]
    cdi = host_facts.exec_start_args(
        render_unit(
            tmp_path,
            servekit_accelerator="gpu",
            servekit_container_gpu_args=["--device", "nvidia.com/gpu=all"],
            vllm_service_shm_size="16g",
        )
    )
    assert host_facts.gpu_args_of(cdi) == ["--device", "nvidia.com/gpu=all"]
    assert host_facts.image_of(cdi) == default_image


def test_image_references_compare_the_way_repo_digests_show_them():
    """The pinned-image check compares (registry, repository, digest) of the configured image
    with those of the image's RepoDigests, which Docker writes without docker.io/library."""
    digest = "sha256:" + "7b5cf896b0105374bebb974c0529d47913364f33161c5ca155452f1e29e96ee1"
    configured = parse_reference(f"docker.io/vllm/vllm-openai:v0.13.0@{digest}")
    repo_digest = parse_reference(f"vllm/vllm-openai@{digest}")  # as RepoDigests shows it
    assert (configured.registry, configured.repository, configured.digest) == (
        repo_digest.registry,
        repo_digest.repository,
        repo_digest.digest,
    )
    assert configured.tag == "v0.13.0" and repo_digest.tag is None
    assert parse_reference("ubuntu:24.04").name == "docker.io/library/ubuntu:24.04"
    sandbox = parse_reference(SANDBOX_IMAGE)
    assert (sandbox.registry, sandbox.repository) == ("servekit-control:5000", "servekit/vllm-cpu")
    assert sandbox.digest == SANDBOX_IMAGE.split("@")[1]


def test_role_defaults_feed_the_host_checks():
    defaults = host_facts.host_defaults()
    assert defaults["nvidia_driver_version"] == "580.126.20"
    assert defaults["nvidia_container_toolkit_version"] == "1.19.1"
    assert defaults["vllm_service_port"] == 8000
    assert defaults["vllm_service_health_interval"] == 7  # the restart-stability window
    assert defaults["servekit_model_root"] == "/opt/models"
    assert "vllm_service_model_path" not in defaults  # a template: unknown without Ansible
    redact = host_facts.redact
    assert redact("ExecStart=x --api-key sk-1", "sk-1") == "ExecStart=x --api-key <API key>"
    assert redact("x --api-key=abc VLLM_API_KEY=def", None) == (
        "x --api-key=<redacted> VLLM_API_KEY=<redacted>"
    )
    assert redact("a sk-12 b sk-1", "sk-1", None, "sk-12") == "a <API key> b <API key>"


def test_host_checks_share_one_ssh_connection_per_host(tmp_path, monkeypatch):
    """testinfra builds its SSH command from ansible.cfg: with control_path spelled out there,
    every command of a host's checks goes through one master connection."""
    import configparser

    from testinfra.utils.ansible_runner import get_ansible_host

    from servekit.verify.run import _pytest_env

    monkeypatch.setenv("HOME", str(tmp_path))
    _pytest_env()  # makes the control_path_dir testinfra requires
    assert (tmp_path / ".ansible" / "cp").is_dir()
    config = configparser.ConfigParser()
    config.read(ROOT / "ansible" / "ansible.cfg")
    hostvars = {"ansible_host": "192.0.2.10", "ansible_port": 22, "ansible_user": "root"}
    inventory = {"_meta": {"hostvars": {"gpu-1": hostvars}}, "all": {"hosts": ["gpu-1"]}}
    host = get_ansible_host(config, inventory, "gpu-1")
    words, _ = host.backend._build_ssh_command("true")
    assert f"-o ControlPath={tmp_path}/.ansible/cp/%%C" in words, words
    assert any("ControlPersist" in w for w in words), words

"""Faults the deployed service must survive on its own (`make test-faults`).

Each test breaks the running sandbox deployment, measures how long until the break is
detected and until /health answers again, and adds a row to the fault table printed at
the end of the run (and written to reports/faults.json).
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import subprocess
import time

import pytest
import requests
from sandbox_helpers import (
    BASE_URL,
    HOST_CONTAINER,
    INVENTORY,
    FirstFailure,
    ansible_playbook,
    failed_checks,
    healthy,
    on_host,
    recap,
    scan_routes,
    served_routes,
    started_and_healthy,
    unexpected_answers,
    vllm_identity,
    wait_for,
    write_scan_report,
)

from servekit.checkout import role_defaults
from servekit.probe import run_probes
from servekit.verify import run_verify

pytestmark = pytest.mark.e2e

# The health timer as the sandbox runs it: the role's defaults (the sandbox sets none).
_HEALTH = role_defaults("vllm_service", plain=True)
HEALTH_INTERVAL_S = int(_HEALTH["vllm_service_health_interval"])
HEALTH_TIMEOUT_S = int(_HEALTH["vllm_service_health_timeout"])
HEALTH_FAILURES = int(_HEALTH["vllm_service_health_failures"])
# A frozen server must be caught as fast as a Kubernetes liveness probe would (10 s x 3).
FREEZE_DETECTION_LIMIT_S = 30
HEALTH_RESTARTS_FILE = "/var/lib/servekit/vllm-health.restarts"
START_BUDGET_S = 600
CRASH_LOOP_BRAKE = {"vllm_service_start_limit_burst": 3}
API_KEY = "sk-servekit-fault-suite-7d41c0e5b2a94f1c"  # 40 characters: preflight wants 32+


def record(table, fault, injected_at, detected_at, healthy_at, data_lost="none"):
    table.append(
        {
            "fault": fault,
            "detected_s": None if detected_at is None else round(detected_at - injected_at, 1),
            "healthy_s": None if healthy_at is None else round(healthy_at - injected_at, 1),
            "data_lost": data_lost,
        }
    )


def model_manifest() -> dict:
    out = on_host("sh", "-c", "cat /opt/models/Qwen/Qwen3-8B/current/.servekit-manifest.json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["files"]


def unit_property(name: str) -> str:
    return on_host("systemctl", "show", "vllm", f"--property={name}", "--value").stdout.strip()


@pytest.fixture
def serving(deployment):
    """Each fault starts from a healthy, started server and must leave one."""
    wait_for(
        started_and_healthy,
        "healthy and started before the fault",
        START_BUDGET_S,
    )
    files = model_manifest()
    yield files
    wait_for(healthy, "healthy after the fault", START_BUDGET_S)
    assert model_manifest() == files, "the model changed during a fault"


def test_container_sigkill_is_restarted_by_systemd(serving, fault_table, tmp_path):
    before = vllm_identity()
    t0 = time.monotonic()
    assert on_host("docker", "kill", "--signal", "KILL", "vllm").returncode == 0
    wait_for(lambda: not healthy(), "/health fails after SIGKILL", 30, 0.1)
    detected = time.monotonic()
    # While the new container starts, `make verify` fails and names the check that saw it.
    down = run_verify(INVENTORY, tmp_path)
    wait_for(healthy, "healthy again after SIGKILL", START_BUDGET_S)
    record(fault_table, "container killed (SIGKILL)", t0, detected, time.monotonic())
    assert vllm_identity()[1] != before[1], "a new container serves"
    # The host checks (which run first) see the unit restarting; the request probes, if the
    # server is still down when they run, see /health fail. Either names the fault.
    assert not down.ok, "verify passed on a server that had just been killed"
    assert failed_checks(down) & {"health", "test_vllm_service_is_active_and_enabled"}, (
        failed_checks(down)
    )


def test_frozen_server_is_restarted_by_the_health_timer(serving, fault_table):
    before = vllm_identity()
    pid = on_host("docker", "inspect", "--format", "{{.State.Pid}}", "vllm").stdout.strip()
    t0 = time.monotonic()
    assert on_host("kill", "-STOP", pid).returncode == 0
    # Port open, no answers: only the timer can notice. Its worst case: the freeze just after
    # a good probe, then `failures` probes one interval apart, the last one timing out.
    window = HEALTH_INTERVAL_S * HEALTH_FAILURES + HEALTH_TIMEOUT_S
    assert window <= FREEZE_DETECTION_LIMIT_S, "the role's health timer is slower than 30 s"
    wait_for(
        lambda: vllm_identity()[0] != before[0], "timer restarts the frozen server", window + 30
    )
    detected = time.monotonic()
    wait_for(healthy, "healthy again after the freeze", START_BUDGET_S)
    record(fault_table, "server frozen (SIGSTOP), port open", t0, detected, time.monotonic())
    journal = on_host("journalctl", "-u", "vllm-health.service", "--no-pager").stdout
    assert "restarting vllm.service" in journal
    # Seconds of slack for the restart to show (a `systemctl show` poll, the kill).
    assert detected - t0 <= FREEZE_DETECTION_LIMIT_S + 2, f"detected after {detected - t0:.1f} s"


def test_engine_death_inside_the_server_is_restarted(serving, fault_table):
    before = vllm_identity()
    kill_all_but_pid1 = (
        "import os, signal\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and int(p) not in (1, os.getpid()):\n"
        "        try: os.kill(int(p), signal.SIGKILL)\n"
        "        except OSError: pass\n"
    )
    t0 = time.monotonic()
    result = on_host("docker", "exec", "vllm", "/opt/venv/bin/python", "-c", kill_all_but_pid1)
    assert result.returncode in (0, 137), result.stderr
    wait_for(lambda: not healthy(), "/health fails once the engine is gone", 120, 0.2)
    detected = time.monotonic()
    wait_for(healthy, "healthy again after the engine died", START_BUDGET_S)
    record(fault_table, "engine process died inside the server", t0, detected, time.monotonic())
    assert vllm_identity() != before


def test_docker_restart_brings_vllm_back(serving, fault_table):
    with FirstFailure() as outage:
        t0 = time.monotonic()
        assert on_host("systemctl", "restart", "docker").returncode == 0
        wait_for(lambda: outage.at is not None, "/health fails once Docker restarts", 60, 0.1)
    wait_for(healthy, "healthy again after a Docker restart", START_BUDGET_S)
    record(fault_table, "Docker daemon restarted", t0, outage.at, time.monotonic())
    wait_for(lambda: unit_property("ActiveState") == "active", "vllm.service started", 60)


def test_host_reboot_brings_everything_back(serving, fault_table):
    with FirstFailure() as outage:
        t0 = time.monotonic()
        subprocess.run(["docker", "restart", HOST_CONTAINER], check=True, capture_output=True)
        wait_for(lambda: outage.at is not None, "/health fails once the host reboots", 60, 0.1)
    wait_for(healthy, "healthy again after a host reboot", START_BUDGET_S)
    record(fault_table, "host rebooted", t0, outage.at, time.monotonic())
    # /health answers a moment before the unit's readiness wait (ExecStartPost) returns.
    wait_for(started_and_healthy, "vllm.service started after the reboot", 60)
    for unit in ("docker", "vllm", "vllm-health.timer"):
        assert on_host("systemctl", "is-active", unit).stdout.strip() == "active", unit
        assert on_host("systemctl", "is-enabled", unit).stdout.strip() == "enabled", unit


def test_crash_loop_stops_at_the_start_limit_and_verify_says_why(serving, fault_table, capfd):
    t0 = time.monotonic()
    # The brake of the role's default (5 starts) at 3: the same systemd start limit, two fewer
    # failed starts to wait for (each imports vLLM). The restoring deploy puts 5 back.
    bad = json.dumps({"vllm_service_extra_args": ["--no-such-flag"], **CRASH_LOOP_BRAKE})
    ansible_playbook("deploy-bad-flag", "site.yml", "-e", bad, expect_ok=False)
    # With Restart=always the unit only stays "failed" once the start limit stops systemd.
    wait_for(
        lambda: unit_property("ActiveState") == "failed",
        "systemd stops restarting a crash loop",
        START_BUDGET_S,
        1.0,
    )
    detected = time.monotonic()
    journal = on_host("journalctl", "-u", "vllm", "--no-pager", "-n", "400").stdout
    assert "Start request repeated too quickly" in journal
    capfd.readouterr()
    result = run_verify(INVENTORY, serving_reports())
    out = capfd.readouterr().out
    assert not result.ok
    assert "no-such-flag" in out, "verify must show why the server does not start"
    restarts = int(unit_property("NRestarts"))
    assert unit_property("StartLimitBurst") == str(
        CRASH_LOOP_BRAKE["vllm_service_start_limit_burst"]
    )
    # Recover with the good flags: the start limit is reset by the deploy.
    ansible_playbook("deploy-after-crash-loop")
    record(fault_table, "crash loop (bad flag), then fixed", t0, detected, time.monotonic())
    assert restarts <= CRASH_LOOP_BRAKE["vllm_service_start_limit_burst"]
    assert unit_property("StartLimitBurst") == str(_HEALTH["vllm_service_start_limit_burst"])


def test_bounded_load_has_no_errors(serving, fault_table):
    body = {
        "model": "Qwen3-8B",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 16,
    }

    def one(_):
        start = time.monotonic()
        try:
            status = requests.post(f"{BASE_URL}/v1/chat/completions", json=body, timeout=120)
            return status.status_code, time.monotonic() - start
        except requests.RequestException as exc:
            return type(exc).__name__, time.monotonic() - start

    restarts_before = health_timer_restarts()
    invocation = vllm_identity()
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(256)))
    errors = [code for code, _ in results if code != 200]
    latencies = sorted(seconds for _, seconds in results)
    p50 = statistics.median(latencies)
    p95 = latencies[int(len(latencies) * 0.95) - 1]
    fault_table.append(
        {
            "fault": f"load: 256 chats, 64 concurrent (p50 {p50:.2f} s, p95 {p95:.2f} s)",
            "detected_s": None,
            "healthy_s": None,
            "data_lost": f"{len(errors)} failed",
        }
    )
    assert errors == [], f"{len(errors)} of 256 requests failed: {errors[:5]}"
    # A server busy with the load still answers its health probes in time: no restart.
    assert health_timer_restarts() == restarts_before, "the health timer restarted the server"
    assert vllm_identity() == invocation, "the server restarted under load"


def health_timer_restarts() -> int:
    """The health timer's restart counter on the host (no file: it never restarted vLLM)."""
    out = on_host("cat", HEALTH_RESTARTS_FILE)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else 0


def test_api_key_is_enforced_never_leaks_and_verify_needs_it(serving, tmp_path, monkeypatch):
    key_only = json.dumps({"vllm_service_api_key": API_KEY})
    before = vllm_identity()
    output = ansible_playbook("deploy-with-key", "site.yml", "-e", key_only)
    try:
        # The route gate reads the new key from its settings file: no restart, no outage.
        assert vllm_identity() == before, "setting the API key restarted vLLM"
        assert API_KEY not in output, "the key appeared in Ansible's output"
        url = f"{BASE_URL}/v1/models"
        assert requests.get(url, timeout=10).status_code == 401
        assert (
            requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code
            == 401
        )
        ok = requests.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert ok.status_code == 200
        chat = requests.post(
            f"{BASE_URL}/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={
                "model": "Qwen3-8B",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
            timeout=120,
        )
        assert chat.status_code == 200, chat.text[:300]

        # Every route the server mounts, asked without the key: only 401/403/404/405, the
        # health routes aside (/metrics answers this machine: it is an admitted scraper).
        scan = scan_routes(BASE_URL, served_routes())
        write_scan_report("route-scan-host", scan)
        assert set(scan.values()) <= {200, 401, 403, 404, 405}, scan
        assert unexpected_answers(scan, metrics=200) == {}, scan
        assert scan["POST /invocations"] == 404 and scan["GET /load"] == 404
        for probe in (
            ["ps", "-eo", "args"],
            ["systemctl", "show", "vllm"],
            ["docker", "inspect", "--format", "{{json .Args}} {{json .Path}}", "vllm"],
            ["journalctl", "-u", "vllm", "--no-pager"],
        ):
            assert API_KEY not in on_host(*probe).stdout, f"the key leaks through {probe[0]}"
        assert on_host("stat", "-c", "%a %U", "/etc/vllm/gate/gate.json").stdout.split() == [
            "600",
            "root",
        ]

        # The inventory does not know the key: verify says the server wants one.
        monkeypatch.delenv("SERVEKIT_API_KEY", raising=False)
        without = run_verify(INVENTORY, tmp_path / "without-key")
        assert not without.ok
        details = " ".join(r.detail for run in without.runs for r in run.results if not r.ok)
        assert "API key" in details
        monkeypatch.setenv("SERVEKIT_API_KEY", API_KEY)
        assert run_verify(INVENTORY, tmp_path / "with-key").ok

        # Published on the host's loopback only: unreachable from outside the host, and
        # verify names the listening address.
        loopback = json.dumps(
            {"vllm_service_api_key": API_KEY, "vllm_service_bind_address": "127.0.0.1"}
        )
        ansible_playbook("deploy-loopback", "site.yml", "-e", loopback)
        with pytest.raises(requests.RequestException):
            requests.get(url, timeout=5)
        curl = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:8000/v1/models",
        ]
        assert on_host(*curl).stdout == "401"
        assert on_host(*curl, "-H", f"Authorization: Bearer {API_KEY}").stdout == "200"
        wrong_address = run_verify(INVENTORY, tmp_path / "loopback")
        failed_hosts = {
            t.name.split("::")[-1]
            for h in wrong_address.hosts
            for t in h.tests
            if t.status == "FAIL"
        }
        assert "test_api_port_listens_on_the_configured_address" in failed_hosts
    finally:
        monkeypatch.delenv("SERVEKIT_API_KEY", raising=False)
        restored = ansible_playbook("deploy-restore-defaults")
    assert recap(restored)["sandbox-1"]["changed"] > 0
    run = run_probes(BASE_URL, "Qwen3-8B", checks=["health", "models", "chat"])
    assert run.ok, [r.detail for r in run.results if not r.ok]


def test_firewall_and_metrics_guard_keep_outsiders_out(serving):
    """From this machine the sandbox host sees connections from Docker's bridge gateway."""

    def inside(path: str) -> str:
        return on_host(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:8000{path}"
        ).stdout

    # Only 192.0.2.0/24 may connect: this machine is reset at once, the host itself passes.
    closed = {
        "vllm_service_firewall_allowed_cidrs": ["192.0.2.0/24"],
        "vllm_service_metrics_allowed_cidrs": [],
    }
    # Neither the firewall nor the gate's /metrics networks restart vLLM when they change.
    before = vllm_identity()
    ansible_playbook("deploy-firewall-closed", "site.yml", "-e", json.dumps(closed))
    assert vllm_identity() == before, "closing the firewall restarted vLLM"
    wait_for(started_and_healthy_inside, "healthy behind the firewall", START_BUDGET_S)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{BASE_URL}/health", timeout=5)
    assert inside("/health") == "200"
    assert inside("/metrics") == "200", "the host itself always reads /metrics"
    rules = on_host("iptables", "-S", "SERVEKIT-VLLM").stdout
    assert "192.0.2.0/24" in rules and "REJECT" in rules, rules

    # This machine's network admitted to the API, but not to /metrics.
    api_only = {
        "vllm_service_firewall_allowed_cidrs": ["172.16.0.0/12"],
        "vllm_service_metrics_allowed_cidrs": [],
    }
    ansible_playbook("deploy-firewall-open", "site.yml", "-e", json.dumps(api_only))
    assert vllm_identity() == before, "admitting a network restarted vLLM"
    wait_for(healthy, "reachable once admitted", 60)
    assert requests.get(f"{BASE_URL}/v1/models", timeout=10).status_code == 200
    metrics = requests.get(f"{BASE_URL}/metrics", timeout=10)
    assert metrics.status_code == 403, metrics.text[:200]
    assert "vllm:" not in metrics.text

    # Back to the inventory's settings: no rules left behind, /metrics for this machine again.
    restored = ansible_playbook("deploy-firewall-removed")
    assert recap(restored)["sandbox-1"]["changed"] > 0
    assert vllm_identity() == before, "removing the firewall restarted vLLM"
    wait_for(healthy, "healthy after the firewall is removed", START_BUDGET_S)
    assert on_host("iptables", "-S", "SERVEKIT-VLLM").returncode != 0, "the chain is left"
    assert requests.get(f"{BASE_URL}/metrics", timeout=10).status_code == 200


def started_and_healthy_inside() -> bool:
    active = on_host("systemctl", "is-active", "vllm").stdout.strip() == "active"
    code = on_host(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8000/health"
    ).stdout
    return active and code == "200"


def serving_reports():
    from sandbox_helpers import ROOT

    return ROOT / "reports" / "faults-verify"

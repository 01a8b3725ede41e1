"""The monitoring stack where the inventory asks for it: Prometheus on the hosts of group
`monitoring` scrapes every target it was given, and node_exporter runs where it is scraped.

`make verify` prints each monitoring host's targets; a target that is not up fails the
check with Prometheus's own reason (lastError). node_exporter listens on the monitoring address
only (monitoring_exporter_listen_address, read from the arguments the role wrote on the host),
and beyond loopback exporters-firewall.service filters it."""

from __future__ import annotations

import json
import re
import time
from contextlib import nullcontext

import pytest

from servekit.verify.host_facts import journal

DEFAULT_LISTEN = "127.0.0.1:9090"
NEXT_SCRAPE_S = 60  # longer than any sensible scrape interval
NODE_EXPORTER_ARGS = "/etc/default/prometheus-node-exporter"
FIREWALL_UNIT = "exporters-firewall.service"
FIREWALL_CHAIN = "SERVEKIT-EXPORTERS"


@pytest.fixture(scope="module")
def groups(inventory_vars) -> list[str]:
    return list(inventory_vars.get("group_names") or [])


@pytest.fixture(scope="module")
def prometheus_url(inventory_vars, groups) -> str:
    if "monitoring" not in groups:
        pytest.skip("not a monitoring host (group `monitoring`)")
    listen = str(inventory_vars.get("monitoring_prometheus_listen_address") or DEFAULT_LISTEN)
    if "{{" in listen:
        listen = DEFAULT_LISTEN
    address, _, port = listen.rpartition(":")
    if address in ("", "0.0.0.0", "::", "[::]"):
        address = "127.0.0.1"
    return f"http://{address}:{port}"


def test_prometheus_is_active_and_enabled(host, prometheus_url):
    service = host.service("prometheus")
    assert service.is_running, "expected prometheus.service active, it is not"
    assert service.is_enabled, "expected prometheus.service enabled at boot, it is not"


def test_prometheus_scrapes_every_target(host, prometheus_url):
    def active_targets() -> list[dict]:
        result = host.run("curl -s --max-time 10 %s/api/v1/targets?state=active", prometheus_url)
        assert result.rc == 0, f"Prometheus does not answer on {prometheus_url}: {result.stderr}"
        return json.loads(result.stdout)["data"]["activeTargets"]

    # A target that is not up may be judged on an old scrape (not scraped yet right after a
    # deploy, or scraped while vLLM restarted): judge every target on a scrape made after
    # this check began (one scrape interval; a poll, not a fixed wait).
    deadline = time.monotonic() + NEXT_SCRAPE_S
    targets = active_targets()
    if any(t["health"] != "up" for t in targets):
        seen = {t["scrapeUrl"]: t["lastScrape"] for t in targets}
        while time.monotonic() < deadline:
            time.sleep(1)
            targets = active_targets()
            if all(t["lastScrape"] != seen.get(t["scrapeUrl"]) for t in targets):
                break
    table = [
        (t["labels"].get("job"), t["labels"].get("host"), t["scrapeUrl"], t["health"])
        for t in targets
    ]
    # `make verify` shows this line beside the check.
    print("report: " + ", ".join(f"{job} {h} {url} {health}" for job, h, url, health in table))
    jobs = {job for job, *_ in table}
    assert {"vllm", "node"} <= jobs, f"expected vllm and node scrape jobs, got {sorted(jobs)}"
    down = [
        f"{t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} "
        f"({t['lastError'] or 'not scraped yet'})"
        for t in targets
        if t["health"] != "up"
    ]
    assert not down, "targets not up: " + "; ".join(down)


@pytest.fixture(scope="module")
def node_exporter_listen(host, inventory_vars, groups) -> tuple[str, str]:
    """(address, port) node_exporter listens on: its --web.listen-address, as the role wrote
    it (the inventory may give the address as a template, e.g. "{{ ansible_host }}")."""
    monitoring = (inventory_vars.get("groups") or {}).get("monitoring") or []
    if not monitoring:
        pytest.skip("the inventory has no `monitoring` group: no exporters are deployed")
    if not {"monitoring", "gpu_hosts"} & set(groups):
        pytest.skip("not scraped by the monitoring role")
    args = host.file(NODE_EXPORTER_ARGS)
    assert args.exists, f"{NODE_EXPORTER_ARGS} is missing: the monitoring role never ran here"
    found = re.search(r"--web\.listen-address=(\S*):([0-9]+)", args.content_string)
    assert found, f"{NODE_EXPORTER_ARGS} sets no --web.listen-address: {args.content_string}"
    return found.group(1), found.group(2)


def test_node_exporter_runs_where_it_is_scraped(host, groups, node_exporter_listen):
    address, port = node_exporter_listen
    service = host.service("prometheus-node-exporter")
    assert service.is_running, "expected prometheus-node-exporter active, it is not"
    assert service.is_enabled, "expected prometheus-node-exporter enabled at boot, it is not"
    metrics = host.run("curl -s --max-time 10 http://%s:%s/metrics", address, port).stdout
    assert "node_systemd_unit_state" in metrics, "node_exporter's systemd collector is off"
    if "gpu_hosts" in groups:
        assert "servekit_vllm_health_restarts_total" in metrics, (
            "the health timer's textfile metrics are missing"
        )


def test_node_exporter_listens_on_the_monitoring_address_only(host, node_exporter_listen):
    address, port = node_exporter_listen
    listening = sorted(
        str(s) for s in host.socket.get_listening_sockets() if str(s).endswith(f":{port}")
    )
    assert listening == [f"tcp://{address}:{port}"], (
        f"expected node_exporter on {address}:{port} only (monitoring_exporter_listen_address),"
        f" got {listening}"
    )


def test_exporters_firewall_matches_the_address(host, node_exporter_listen):
    address, port = node_exporter_listen
    unit = host.service("exporters-firewall")
    if address.startswith("127."):
        assert not host.file(f"/etc/systemd/system/{FIREWALL_UNIT}").exists, (
            f"expected no {FIREWALL_UNIT} (the exporters are on loopback), it exists: re-deploy"
        )
        return
    assert unit.is_running, (
        f"expected {FIREWALL_UNIT} active (exporters on {address}), it is not; journal:\n"
        + journal(host, FIREWALL_UNIT)
    )
    assert unit.is_enabled, f"{FIREWALL_UNIT} is not enabled: no rules after a reboot"
    with host.sudo() if host.user().name != "root" else nullcontext():
        input_rules = host.run("iptables -w -S INPUT").stdout.splitlines()
        chain = host.run("iptables -w -S %s", FIREWALL_CHAIN).stdout.splitlines()
    appended = [rule for rule in input_rules if rule.startswith("-A ")]
    assert appended[:1] == [f"-A INPUT -j {FIREWALL_CHAIN}"], (
        f"expected INPUT to jump first to {FIREWALL_CHAIN}, got {input_rules}"
    )
    last = [rule for rule in chain if rule.startswith("-A ")][-1:]
    assert last == [
        f"-A {FIREWALL_CHAIN} -d {address}/32 -p tcp -m tcp --dport {port}"
        " -j REJECT --reject-with tcp-reset"
    ], f"expected {FIREWALL_CHAIN} to end by resetting other scrapers, got {chain}"

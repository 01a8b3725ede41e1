"""The API firewall (`vllm_service_firewall_allowed_cidrs`): when the list is set, Docker's
DOCKER-USER chain jumps first to servekit's chain, which admits exactly those networks to the
API port and resets everyone else, and vllm-firewall.service is active and enabled (so the
rules come back after a reboot or a Docker restart). When it is empty, none of it is on the
host. Connections from the host itself are never filtered, so this is checked on the rules,
not with a probe from here."""

from __future__ import annotations

import ipaddress

import pytest

from servekit.inventory import is_unresolved
from servekit.verify.host_facts import journal, run_as_root

CHAIN = "SERVEKIT-VLLM"
UNIT = "vllm-firewall.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT}"


@pytest.fixture(scope="module")
def allowed(inventory_vars, hostvars) -> list[str]:
    """The allow-list as the inventory gives it, or the role default (empty)."""
    raw = inventory_vars.get("vllm_service_firewall_allowed_cidrs")
    if is_unresolved(raw) or (isinstance(raw, list) and any(map(is_unresolved, raw))):
        pytest.skip("vllm_service_firewall_allowed_cidrs is a template: nothing to compare with")
    return list(hostvars.get("vllm_service_firewall_allowed_cidrs") or [])


def chain_rules(host, chain: str) -> list[str] | None:
    """`iptables -S CHAIN` lines, or None when the chain does not exist."""
    result = run_as_root(host, "iptables -w -S %s", chain)
    return result.stdout.splitlines() if result.rc == 0 else None


def test_firewall_unit_matches_the_setting(host, allowed):
    unit = host.service("vllm-firewall")
    if allowed:
        assert unit.is_running, (
            f"expected {UNIT} active (allow-list {allowed}), it is not; journal:\n"
            + journal(host, UNIT)
        )
        assert unit.is_enabled, f"{UNIT} is not enabled: the rules would not return after a reboot"
    else:
        assert not host.file(UNIT_FILE).exists, (
            f"expected no {UNIT_FILE} (vllm_service_firewall_allowed_cidrs is empty), it exists: "
            "re-deploy to remove it"
        )
        assert not unit.is_running, f"expected {UNIT} inactive (no allow-list), it is active"


def test_docker_user_jumps_to_the_allow_list(host, hostvars, allowed):
    docker_user = chain_rules(host, "DOCKER-USER") or []
    jumps = [rule for rule in docker_user if rule == f"-A DOCKER-USER -j {CHAIN}"]
    rules = chain_rules(host, CHAIN)
    if not allowed:
        assert not jumps and rules is None, (
            f"expected no {CHAIN} chain (vllm_service_firewall_allowed_cidrs is empty), got "
            f"{rules}; DOCKER-USER: {docker_user}"
        )
        return
    appended = [rule for rule in docker_user if rule.startswith("-A ")]
    assert appended[:1] == [f"-A DOCKER-USER -j {CHAIN}"] and len(jumps) == 1, (
        f"expected DOCKER-USER to jump to {CHAIN} once, first; got {docker_user}"
    )
    assert rules is not None, f"expected the {CHAIN} chain, it is missing"
    port = f"--ctorigdstport {hostvars['vllm_service_port']} "
    sources = sorted(
        rule.split("-s ", 1)[1].split()[0]
        for rule in rules
        if rule.endswith("-j RETURN") and port in rule and "-s " in rule
    )
    expected = sorted(str(ipaddress.ip_network(cidr)) for cidr in allowed)
    assert sources == expected, f"expected {CHAIN} to admit {expected} only, got: {rules}"
    last = [rule for rule in rules if rule.startswith("-A ")][-1:]
    assert last and port in last[0] and last[0].endswith("-j REJECT --reject-with tcp-reset"), (
        f"expected {CHAIN} to end by resetting every other connection to the port, got {rules}"
    )

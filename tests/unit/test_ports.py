"""The port-clash check of the preflight play (`servekit_port_clashes`), without a play.

Each role's preflight records what it listens on (`_<role>_listeners` in its vars/main.yml); the
preflight play's last play hands the host's whole list to this filter. Two listeners clash when
they take the same TCP port on overlapping addresses; the message names both settings with
their values, and offers a port no listener of the host uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import servekit_net  # ansible/plugins/filter, on pytest's pythonpath
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"


def listener(setting: str, port: int, address: str = "0.0.0.0", **extra) -> dict:
    return {
        "service": setting.split("_port")[0],
        "setting": setting,
        "value": port,
        "address": address,
        "port": port,
        **extra,
    }


VLLM = listener("vllm_service_port", 8000, address_setting="vllm_service_bind_address")
GATEWAY = listener("gateway_port", 8000, address_setting="gateway_bind_address")


def test_services_on_their_own_ports_do_not_clash():
    listeners = [
        VLLM,
        listener("gateway_port", 8080),
        listener("gateway_stats_port", 8404, "127.0.0.1"),
        {
            "service": "Prometheus",
            "setting": "monitoring_prometheus_listen_address",
            "value": "127.0.0.1:9090",
        },
        listener("monitoring_node_exporter_port", 9100, "127.0.0.1"),
        listener("monitoring_dcgm_exporter_port", 9400, "127.0.0.1"),
    ]
    assert servekit_net.port_clashes(listeners) == []


def test_one_port_on_two_different_addresses_is_no_clash():
    # A gateway on the LAN address in front of a vLLM on loopback, both on 8000.
    on_loopback = listener("vllm_service_port", 8000, "127.0.0.1")
    on_lan = listener("gateway_port", 8000, "10.20.0.5")
    assert servekit_net.port_clashes([on_loopback, on_lan]) == []
    assert servekit_net.port_clashes([on_loopback, listener("gateway_port", 8000, "::1")]) == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("127.0.0.1", "0.0.0.0"),
        ("::", "10.20.0.5"),  # a dual-stack wildcard takes the IPv4 addresses too
        ("", "10.20.0.5"),  # no host: every address
        ("10.20.0.5", "10.20.0.5"),
        ("localhost", "127.0.0.1"),
        ("[::1]", "::1"),
    ],
)
def test_overlapping_addresses_on_one_port_clash(first, second):
    clashes = servekit_net.port_clashes(
        [listener("vllm_service_port", 8000, first), listener("gateway_port", 8000, second)]
    )
    assert len(clashes) == 1, clashes


def test_the_message_names_both_settings_and_a_free_port():
    listeners = [VLLM, GATEWAY, listener("gateway_stats_port", 8001, "127.0.0.1")]
    assert servekit_net.port_clashes(listeners) == [
        "vllm_service_port=8000 (vllm_service on every address) and gateway_port=8000 (gateway on"
        " every address) would both listen on port 8000: give one of them another port, e.g."
        " gateway_port: 8002, or bind them to different addresses (vllm_service_bind_address,"
        " gateway_bind_address)."
    ]


def test_a_listen_address_setting_is_read_and_moved_as_host_and_port():
    prometheus = {
        "service": "Prometheus",
        "setting": "monitoring_prometheus_listen_address",
        "value": "[::]:8000",
        "address_setting": "monitoring_prometheus_listen_address",
    }
    [clash] = servekit_net.port_clashes([VLLM, prometheus])
    assert 'monitoring_prometheus_listen_address="[::]:8000" (Prometheus on every address)' in clash
    assert "e.g. monitoring_prometheus_listen_address: [::]:8001" in clash


def test_two_exporters_on_one_address_setting_are_only_offered_another_port():
    node = listener(
        "monitoring_node_exporter_port",
        9100,
        "10.0.0.11",
        address_setting="monitoring_exporter_listen_address",
    )
    dcgm = dict(node, setting="monitoring_dcgm_exporter_port", service="the DCGM exporter")
    [clash] = servekit_net.port_clashes([node, dcgm])
    assert clash.endswith("e.g. monitoring_dcgm_exporter_port: 9101.")


def test_every_clashing_pair_is_reported():
    three = [VLLM, GATEWAY, listener("monitoring_node_exporter_port", 8000, "127.0.0.1")]
    assert len(servekit_net.port_clashes(three)) == 3


def test_a_value_that_is_not_a_list_is_left_to_the_roles_checks():
    assert servekit_net.port_clashes(None) == []
    assert servekit_net.port_clashes("8000") == []


@pytest.mark.parametrize(
    ("role", "variable"),
    [
        ("vllm_service", "_vllm_service_listeners"),
        ("gateway", "_gateway_listeners"),
        ("monitoring", "_monitoring_listeners"),
    ],
)
def test_each_role_records_its_listeners_for_the_check(role, variable):
    """Each role declares its listeners and its preflight records them under the name the
    preflight role's check reads."""
    assert variable in (ROLES / role / "vars" / "main.yml").read_text()
    preflight = yaml.safe_load((ROLES / role / "tasks" / "preflight.yml").read_text())
    recorded = [t["ansible.builtin.set_fact"] for t in preflight if "ansible.builtin.set_fact" in t]
    assert {"_" + variable: "{{ " + variable + " }}"} in recorded
    assert "_" + variable in (ROLES / "preflight" / "tasks" / "ports.yml").read_text()

"""Filters that judge network settings for the roles' preflight checks.

Pure functions over the values as the inventory gives them, so the checks are unit-tested
without a play (tests/unit/test_firewall.py).
"""

from __future__ import annotations

import ipaddress
import json


def ipv4_network_problems(values: object) -> list[str]:
    """One phrase per entry of ``values`` that is not an IPv4 address or network, quoting the
    entry and saying what is wrong with it; empty when every entry is fine.

    A bare address stands for that host (/32). A network with host bits set is refused with
    the network it was probably meant to be: ``10.0.0.1/8`` admits all of 10.0.0.0/8, which
    is rarely what the writer of "10.0.0.1" meant. ``values`` that is not a list is judged
    elsewhere (the preflight says so by itself) and gives no phrase here.
    """
    if not isinstance(values, list):
        return []
    problems = []
    for value in values:
        shown = json.dumps(value)
        if not isinstance(value, str):
            problems.append(f"{shown} is not text")
            continue
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            address, _, prefix = value.partition("/")
            if prefix.isdigit() and _is_ipv4_address(address):
                problems.append(f"{shown} has a prefix length above 32")
            else:
                problems.append(f"{shown} is not an IP address or network")
            continue
        if network.version != 4:
            problems.append(f"{shown} is IPv6 (the firewall filters IPv4 only)")
            continue
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError:
            problems.append(f"{shown} has host bits set (the network is {network})")
    return problems


def _is_ipv4_address(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


class FilterModule:
    def filters(self):
        return {"servekit_ipv4_network_problems": ipv4_network_problems}

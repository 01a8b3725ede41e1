"""Filters that judge network settings for the roles' preflight checks.

Pure functions over the values as the inventory gives them, so the checks are unit-tested
without a play (tests/unit/test_firewall.py, tests/unit/test_ports.py).
"""

from __future__ import annotations

import ipaddress
import json
from itertools import combinations

# Listening on these takes the port on every address of the host (Go and Docker listen on
# both IPv4 and IPv6 for "::", and Linux refuses a wildcard bind beside a specific one).
_WILDCARD = {"", "*", "0.0.0.0", "::"}


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


def port_clashes(listeners: object) -> list[str]:
    """One phrase per pair of ``listeners`` that would take the same TCP port of one host,
    naming both settings, their values and a fix; empty when every service has its own.

    A listener is a mapping with ``service`` (what listens, for the reader), ``setting`` (the
    variable that sets its port) and ``value`` (that variable's value), and ``address`` and
    ``port``; without ``port``, ``value`` is ``host:port`` (as Prometheus' listen address).
    ``address_setting`` names the variable that sets the address, where one does. Two
    listeners clash on the same port when their addresses are the same or either is a
    wildcard (0.0.0.0, ::, or no host): the kernel refuses the second bind. The fix offered
    moves the second of the pair to the first port above that no listener of the host uses.
    """
    if not isinstance(listeners, list):
        return []
    entries = [_listener(item) for item in listeners if isinstance(item, dict)]
    used = {entry["port"] for entry in entries}
    problems = []
    for first, second in combinations(entries, 2):
        if first["port"] != second["port"] or not _overlap(first["address"], second["address"]):
            continue
        port = first["port"]
        free = next((p for p in range(port + 1, 65536) if p not in used), None)
        fix = "give one of them another port"
        if free is not None:
            fix += f", e.g. {_moved(second, free)}"
        settings = [entry.get("address_setting") for entry in (first, second)]
        if all(settings) and settings[0] != settings[1]:
            fix += f", or bind them to different addresses ({settings[0]}, {settings[1]})"
        problems.append(
            f"{_shown(first)} and {_shown(second)} would both listen on port {port}: {fix}."
        )
    return problems


def _listener(item: dict) -> dict:
    entry = dict(item)
    if entry.get("port") in (None, ""):
        host, _, port = str(entry.get("value", "")).rpartition(":")
        entry["address"], entry["port"] = host, port
    entry["address"] = str(entry.get("address") or "")
    entry["port"] = int(entry["port"])
    return entry


def _normal(address: str) -> str:
    address = address.strip()
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if address == "localhost":
        return "127.0.0.1"
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address


def _overlap(first: str, second: str) -> bool:
    first, second = _normal(first), _normal(second)
    return first == second or first in _WILDCARD or second in _WILDCARD


def _shown(entry: dict) -> str:
    address = _normal(entry["address"])
    where = "every address" if address in _WILDCARD else address
    return f"{entry['setting']}={json.dumps(entry.get('value'))} ({entry['service']} on {where})"


def _moved(entry: dict, port: int) -> str:
    """The setting that puts ``entry`` on ``port`` instead, as YAML."""
    value = entry.get("value")
    if isinstance(value, str) and ":" in value:
        return f"{entry['setting']}: {value.rpartition(':')[0]}:{port}"
    return f"{entry['setting']}: {port}"


class FilterModule:
    def filters(self):
        return {
            "servekit_ipv4_network_problems": ipv4_network_problems,
            "servekit_port_clashes": port_clashes,
        }

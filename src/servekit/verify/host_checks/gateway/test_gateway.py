"""Is the gateway converged: HAProxy pinned, held, active and enabled; its configuration valid
and listing every host of the backend group; every backend UP by HAProxy's own active checks
and in rotation (a drain left by an interrupted roll-out is a finding); the ports where they
belong; the edge key private; /metrics refused through the gateway unless exposed, and paths off the
allow-list closed.

`servekit verify` runs this for the hosts of group `gateway` (the vLLM host checks are for
gpu_hosts). Settings come from the inventory, with the gateway role's defaults."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from servekit.checkout import ROLES, repo_root, role_defaults
from servekit.inventory import is_unresolved
from servekit.verify.host_facts import journal, run_as_root

ROLE = repo_root() / ROLES / "gateway"
CONFIG = "/etc/haproxy/haproxy.cfg"
KEYS = "/etc/haproxy/servekit-api-keys.lst"
API = "/usr/local/libexec/servekit/haproxy-api"


@pytest.fixture(scope="module")
def gw(inventory_vars) -> dict[str, Any]:
    """The gateway role's settings for this host: defaults overlaid with plain inventory values."""
    values = role_defaults("gateway", plain=True)
    values.update({k: v for k, v in inventory_vars.items() if not is_unresolved(v)})
    return values


@pytest.fixture(scope="module")
def backends(inventory_vars, gw) -> list[str]:
    return list((inventory_vars.get("groups") or {}).get(gw["gateway_backend_group"], []))


def test_haproxy_is_pinned_and_held(host):
    pinned = yaml.safe_load((ROLE / "vars" / "Debian-12.yml").read_text())
    pkg = host.package("haproxy")
    assert pkg.is_installed, "the haproxy package is not installed"
    info = host.system_info
    if (info.distribution, info.release.split(".")[0]) == ("debian", "12"):
        expected = pinned["_gateway_default_haproxy_version"]
        assert pkg.version == expected, f"expected haproxy {expected}, got {pkg.version}"
    held = host.run("apt-mark showhold").stdout.split()
    assert "haproxy" in held, f"expected haproxy held against upgrades, held: {held}"


def test_haproxy_is_active_and_enabled(host):
    service = host.service("haproxy")
    assert service.is_running, f"haproxy is not running; journal:\n{journal(host, 'haproxy')}"
    assert service.is_enabled, "haproxy.service is not enabled: it would not come back on boot"


def test_configuration_is_valid_and_lists_every_backend(host, backends):
    check = run_as_root(host, "haproxy -c -f %s", CONFIG)
    assert check.rc == 0, f"haproxy -c -f {CONFIG} failed: {(check.stdout + check.stderr)[-600:]}"
    config = host.file(CONFIG).content_string
    servers = [ln.split()[1] for ln in config.splitlines() if ln.strip().startswith("server ")]
    assert sorted(servers) == sorted(backends), (
        f"expected one server per host of the backend group {sorted(backends)}, got {servers}: "
        "re-run the gateway playbook after changing the inventory"
    )


def test_every_backend_is_up_and_in_rotation(host, backends):
    result = run_as_root(host, API + " status")
    assert result.rc == 0, f"{API} status failed: {result.stderr.strip()}"
    servers = {s["name"]: s for s in json.loads(result.stdout)}
    down = {n: s["op_state"] for n, s in servers.items() if not s["up"]}
    assert not down, (
        f"expected every backend to pass its /health check, got {down} "
        f"(addresses: { {n: servers[n]['address'] for n in down} })"
    )
    out = [n for n, s in servers.items() if s["drain"] or s["maint"]]
    assert not out, (
        f"expected every backend in rotation, got {out} drained or in maintenance (an "
        f"interrupted roll-out?): `{API} ready NAME` on the gateway puts one back"
    )
    assert set(servers) == set(backends), f"expected servers {backends}, got {sorted(servers)}"


def test_ports_where_they_belong(host, gw):
    port, bind = gw["gateway_port"], str(gw["gateway_bind_address"])
    listening = [str(s) for s in host.socket.get_listening_sockets()]
    on_port = [s for s in listening if s.endswith(f":{port}")]
    assert on_port, f"expected the gateway on {bind}:{port}, nothing listens on port {port}"
    if bind not in ("0.0.0.0", "::"):
        assert all(bind in s for s in on_port), f"expected {bind}:{port} only, got {on_port}"
    stats = [s for s in listening if s.endswith(f":{gw['gateway_stats_port']}")]
    assert stats == [f"tcp://127.0.0.1:{gw['gateway_stats_port']}"], (
        f"expected the stats page on loopback only, got {stats}"
    )


def test_api_key_file_is_private_and_the_key_in_no_arguments(host):
    keys = host.file(KEYS)
    assert keys.exists, f"{KEYS} is missing"
    assert keys.user == "root" and keys.mode == 0o600, (
        f"expected {KEYS} owned by root with mode 0o600, got {keys.user} {oct(keys.mode)}"
    )
    text = run_as_root(host, "cat %s", KEYS).stdout
    secrets = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    places = host.check_output("ps -eo args") + host.run("systemctl show haproxy").stdout
    leaked = [s[:4] + "..." for s in secrets if s in places]
    assert not leaked, f"expected the gateway key in no process arguments, found {leaked}"


def _gateway_status(host, gw, path: str) -> str:
    """HTTP status of GET ``path`` through the gateway, from the gateway host (TLS when the
    configuration terminates it; the certificate is not the point here)."""
    bind = str(gw["gateway_bind_address"])
    address = "127.0.0.1" if bind in ("0.0.0.0", "127.0.0.1") else bind
    tls = " ssl crt " in run_as_root(host, "cat %s", CONFIG).stdout
    url = f"{'https' if tls else 'http'}://{address}:{gw['gateway_port']}{path}"
    curl = "curl --silent --insecure --output /dev/null --max-time 5 --write-out '%%{http_code}' %s"
    return host.run(curl, url).stdout.strip()


def test_metrics_are_refused_through_the_gateway(host, gw):
    if gw["gateway_expose_metrics"] is True:
        pytest.skip("gateway_expose_metrics is true")
    code = _gateway_status(host, gw, "/metrics")
    assert code == "403", f"expected GET /metrics refused with 403 through the gateway, got {code}"


def test_routes_off_the_allow_list_are_closed_at_the_gateway(host, gw):
    allowed = set(gw["gateway_allowed_routes"])
    for path in ("/invocations", "/load", "/docs", "/openapi.json", "/scale_elastic_ep"):
        if path in allowed:
            continue
        code = _gateway_status(host, gw, path)
        assert code == "404", f"expected GET {path} closed (404) at the gateway, got {code}"

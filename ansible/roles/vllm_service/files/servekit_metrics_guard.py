"""ASGI middleware that keeps vLLM's /metrics private to listed networks.

vLLM serves Prometheus metrics on its API port and has no switch to turn them off, so an API
client could read them. Loaded with vLLM's own ``--middleware servekit_metrics_guard.MetricsGuard``;
the allowed networks come from ``SERVEKIT_METRICS_ALLOWED_CIDRS`` (comma separated). The host
itself always passes: loopback, and the container's default gateway, which is the address a
connection from the host to its published port arrives from. Every other client gets 403 on
/metrics; nothing else is touched. Standard library only: it runs inside
whatever image serves the model.
"""

from __future__ import annotations

import ipaddress
import json
import os

ENV = "SERVEKIT_METRICS_ALLOWED_CIDRS"


def allowed_networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c.strip(), strict=False) for c in value.split(",") if c.strip()]


def default_gateway(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway of this network namespace (the Docker host's bridge address)."""
    try:
        with open(route_file) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return str(ipaddress.IPv4Address(int(fields[2], 16).to_bytes(4, "little")))
    except OSError:
        return None
    return None


def is_metrics_path(path: str) -> bool:
    # vLLM mounts its metrics app on ^/metrics(?P<path>.*)$: /metricsx serves them too.
    return path.startswith("/metrics")


class MetricsGuard:
    def __init__(self, app, cidrs: str | None = None, route_file: str = "/proc/net/route") -> None:
        self.app = app
        self.networks = allowed_networks(os.environ.get(ENV, "") if cidrs is None else cidrs)
        self.networks += allowed_networks("127.0.0.0/8,::1/128")
        gateway = default_gateway(route_file)
        if gateway:
            self.networks.append(ipaddress.ip_network(gateway))

    def allows(self, client) -> bool:
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks if net.version == address.version)

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] != "http"
            or not is_metrics_path(scope.get("path", ""))
            or self.allows(scope.get("client"))
        ):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": {"message": "/metrics is not served to this address", "code": 403}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

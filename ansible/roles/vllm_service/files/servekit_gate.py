"""ASGI middleware that closes vLLM to everything but a route allow-list.

vLLM's ``--api-key`` guards only ``/v1/*``: ``/invocations`` (chat and completions again),
``/tokenize``, ``/scale_elastic_ep``, ``/load``, ``/docs`` and more answer anyone, and its
Prometheus metrics share the API port. Loaded with vLLM's own
``--middleware servekit_gate.RouteGate``, this gate answers before any of them:

- a path not in ``SERVEKIT_ALLOWED_ROUTES`` (comma separated; an entry ending in ``/*`` allows
  what lies below it) gets 404, whoever asks;
- ``/metrics`` (that exact path) is served to the host itself and the networks in
  ``SERVEKIT_METRICS_ALLOWED_CIDRS``, or to everyone when ``SERVEKIT_METRICS_PUBLIC=1``;
  others get 403. The host itself is loopback and the container's default gateway, the
  address a connection from the host to its published port arrives from;
- when ``VLLM_API_KEY`` is set, every allowed route but ``/health``, ``/ping`` and
  ``/version`` needs ``Authorization: Bearer <key>`` (compared in constant time), else 401.

Paths are compared as the server routes them (percent-decoded, exact). Standard library only:
it runs inside whatever image serves the model.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os

ROUTES_ENV = "SERVEKIT_ALLOWED_ROUTES"
METRICS_CIDRS_ENV = "SERVEKIT_METRICS_ALLOWED_CIDRS"
METRICS_PUBLIC_ENV = "SERVEKIT_METRICS_PUBLIC"
KEY_ENV = "VLLM_API_KEY"
METRICS = "/metrics"
# What a load balancer or a health check asks without a key, as vLLM itself allows.
OPEN_ROUTES = frozenset({"/health", "/ping", "/version"})


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


class Routes:
    """The allow-list: exact paths, and prefixes written as ``/v1/responses/*``."""

    def __init__(self, value: str) -> None:
        entries = [r.strip() for r in value.split(",") if r.strip()]
        self.exact = frozenset(e for e in entries if not e.endswith("/*"))
        self.prefixes = tuple(e[:-1] for e in entries if e.endswith("/*"))

    def __contains__(self, path: str) -> bool:
        return path in self.exact or (
            path.startswith(self.prefixes) and "/../" not in path and not path.endswith("/..")
        )


class RouteGate:
    def __init__(
        self,
        app,
        routes: str | None = None,
        cidrs: str | None = None,
        key: str | None = None,
        metrics_public: bool | None = None,
        route_file: str = "/proc/net/route",
    ) -> None:
        env = os.environ
        self.app = app
        self.routes = Routes(env.get(ROUTES_ENV, "") if routes is None else routes)
        self.key = (env.get(KEY_ENV, "") if key is None else key).encode()
        if metrics_public is None:
            metrics_public = env.get(METRICS_PUBLIC_ENV, "") == "1"
        self.metrics_public = metrics_public
        self.networks = allowed_networks(env.get(METRICS_CIDRS_ENV, "") if cidrs is None else cidrs)
        self.networks += allowed_networks("127.0.0.0/8,::1/128")
        gateway = default_gateway(route_file)
        if gateway:
            self.networks.append(ipaddress.ip_network(gateway))

    def allows(self, client) -> bool:
        """May this peer read /metrics?"""
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks if net.version == address.version)

    def has_key(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    def verdict(self, scope) -> tuple[int, str] | None:
        """None to pass the request on, else the status and message to answer with."""
        path = scope.get("path", "")
        if path == METRICS:
            if self.metrics_public or self.allows(scope.get("client")):
                return None
            return 403, "/metrics is not served to this address"
        if path not in self.routes:
            return 404, "Not Found"
        if self.key and path not in OPEN_ROUTES and not self.has_key(scope):
            return 401, "Unauthorized"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.verdict(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
        else:
            await refuse(send, *refusal)


async def refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

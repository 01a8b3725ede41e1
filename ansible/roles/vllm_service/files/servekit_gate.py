"""ASGI middleware that closes vLLM to everything but a route allow-list.

vLLM's ``--api-key`` guards only ``/v1/*``: ``/invocations`` (chat and completions again),
``/tokenize``, ``/scale_elastic_ep``, ``/load``, ``/docs`` and more answer anyone, and its
Prometheus metrics share the API port. Loaded with vLLM's own
``--middleware servekit_gate.RouteGate``, this gate answers before any of them. Its settings
are a JSON file named by ``SERVEKIT_GATE_CONFIG`` (the vllm_service role writes it):

- a path not in ``allowed_routes`` (an entry ending in ``/*`` allows what lies below it) gets
  404, whoever asks;
- ``/metrics`` (that exact path) is served to the host itself and the networks in
  ``metrics_allowed_cidrs``, or to everyone when ``metrics_public`` is true; others get 403.
  The host itself is loopback and the container's default gateway, the address a connection
  from the host to its published port arrives from;
- when ``api_key`` is not empty, every allowed route but ``/health``, ``/ping`` and
  ``/version`` needs ``Authorization: Bearer <key>`` (compared in constant time), else 401.

The file must be valid when the server starts, or the server does not start. Each request
then looks at the file's inode, mtime and size, and a changed file is read again: a new key,
allow-list or network applies without restarting the server. A file that cannot be read or
parsed then leaves the last good settings in force, with one warning per failure.

Paths are compared as the server routes them (percent-decoded, exact). Standard library only:
it runs inside whatever image serves the model.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os

CONFIG_ENV = "SERVEKIT_GATE_CONFIG"
METRICS = "/metrics"
# What a load balancer or a health check asks without a key, as vLLM itself allows.
OPEN_ROUTES = frozenset({"/health", "/ping", "/version"})
HOST_ITSELF = ("127.0.0.0/8", "::1/128")

log = logging.getLogger("servekit_gate")


class GateConfigError(Exception):
    """The settings file is missing, unreadable or not what the gate expects."""


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

    def __init__(self, entries: list[str]) -> None:
        entries = [r.strip() for r in entries if r.strip()]
        self.exact = frozenset(e for e in entries if not e.endswith("/*"))
        self.prefixes = tuple(e[:-1] for e in entries if e.endswith("/*"))

    def __contains__(self, path: str) -> bool:
        return path in self.exact or (
            path.startswith(self.prefixes) and "/../" not in path and not path.endswith("/..")
        )


class Settings:
    """One version of the settings file."""

    def __init__(self, data: object, host_networks: list) -> None:
        if not isinstance(data, dict):
            raise GateConfigError("expected a JSON object")
        routes = _strings(data, "allowed_routes")
        cidrs = _strings(data, "metrics_allowed_cidrs")
        if not isinstance(data.get("metrics_public"), bool):
            raise GateConfigError("metrics_public must be true or false")
        if not isinstance(data.get("api_key"), str):
            raise GateConfigError('api_key must be a string ("" for none)')
        try:
            networks = [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs]
        except ValueError as exc:
            raise GateConfigError(f"metrics_allowed_cidrs: {exc}") from None
        self.routes = Routes(routes)
        self.networks = networks + host_networks
        self.metrics_public = data["metrics_public"]
        self.key = data["api_key"].encode()


def _strings(data: dict, name: str) -> list[str]:
    value = data.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GateConfigError(f"{name} must be a list of strings")
    return value


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_settings(path: str, host_networks: list) -> tuple[tuple[int, int, int], Settings]:
    """The file's version (inode, mtime, size) and its settings; GateConfigError if unusable.
    The messages name the file and the fault, never the file's content (it holds the key)."""
    try:
        with open(path, "rb") as f:
            version = _version(os.fstat(f.fileno()))
            raw = f.read()
    except OSError as exc:
        raise GateConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise GateConfigError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        message = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise GateConfigError(f"{path} is not JSON: {message}") from None
    try:
        return version, Settings(data, host_networks)
    except GateConfigError as exc:
        raise GateConfigError(f"{path}: {exc}") from None


class RouteGate:
    def __init__(self, app, config: str | None = None, route_file: str = "/proc/net/route"):
        self.app = app
        self.path = os.environ.get(CONFIG_ENV, "") if config is None else config
        if not self.path:
            raise GateConfigError(f"{CONFIG_ENV} is not set: the gate has no settings file")
        self.host_networks = [ipaddress.ip_network(n) for n in HOST_ITSELF]
        gateway = default_gateway(route_file)
        if gateway:
            self.host_networks.append(ipaddress.ip_network(gateway))
        # The version last read, good or bad: a bad file is warned about once, not per request.
        self.version, self.settings = read_settings(self.path, self.host_networks)

    def refresh(self) -> None:
        """Read the file again when it changed since it was last read."""
        try:
            version = _version(os.stat(self.path))
        except OSError as exc:
            version, problem = None, f"cannot read {self.path}: {exc.strerror}"
        if version == self.version:
            return
        self.version = version
        if version is not None:
            try:
                self.version, self.settings = read_settings(self.path, self.host_networks)
                return
            except GateConfigError as exc:
                problem = str(exc)
        log.warning("%s; the route gate keeps the settings it read last", problem)

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
        networks = self.settings.networks
        return any(address in net for net in networks if net.version == address.version)

    def has_key(self, scope, key: bytes) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
        return False

    def verdict(self, scope) -> tuple[int, str] | None:
        """None to pass the request on, else the status and message to answer with."""
        settings = self.settings
        path = scope.get("path", "")
        if path == METRICS:
            if settings.metrics_public or self.allows(scope.get("client")):
                return None
            return 403, "/metrics is not served to this address"
        if path not in settings.routes:
            return 404, "Not Found"
        if settings.key and path not in OPEN_ROUTES and not self.has_key(scope, settings.key):
            return 401, "Unauthorized"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self.refresh()
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


# vLLM imports this module before it serves, but builds its middleware only on the first ASGI
# event, where uvicorn takes a failure for "lifespan unsupported" and serves 500s. Checking the
# file here makes a bad one stop the server at start, with this message in its journal.
if os.environ.get(CONFIG_ENV):
    read_settings(os.environ[CONFIG_ENV], [])

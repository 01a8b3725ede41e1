"""The route gate vLLM loads with --middleware: an allow-list, the key, /metrics by address."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

GATE = Path(__file__).resolve().parents[2] / "ansible/roles/vllm_service/files/servekit_gate.py"
spec = importlib.util.spec_from_file_location("servekit_gate", GATE)
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)

ALLOWED = (
    "/v1/models,/v1/chat/completions,/v1/completions,/tokenize,/detokenize,/health,/ping,/version"
)
KEY = "k" * 40
# vLLM 0.32.0's routes that the default list leaves out (its start-up route list, and the
# unguarded ones vLLM's security guide names).
CLOSED = [
    "/invocations",
    "/pooling",
    "/classify",
    "/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/audio/transcriptions",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/load",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
    "/server_info",
    "/reset_prefix_cache",
    "/sleep",
    "/wake_up",
    "/collective_rpc",
    "/v1/load_lora_adapter",
    "/metricsx",
    "/metrics/",
    "/",
    "/v1/models/",
    "//v1/models",
]


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"vllm:num_requests_running 0\n"})


ROUTES = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
)


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> str:
    """/proc/net/route of a container on a 172.18.0.0/16 bridge (the host is 172.18.0.1)."""
    path = tmp_path_factory.mktemp("proc") / "route"
    path.write_text(ROUTES)
    return str(path)


def request(
    path: str,
    client: str | None = "192.168.1.20",
    cidrs: str = "",
    route_file: str = "/nonexistent",
    key: str = "",
    authorization: bytes | None = None,
    allowed: str = ALLOWED,
    metrics_public: bool = False,
) -> tuple[int, bytes, dict]:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    headers = [(b"host", b"h")]
    if authorization is not None:
        headers.append((b"Authorization", authorization))
    scope = {
        "type": "http",
        "path": path,
        "headers": headers,
        "client": (client, 51234) if client else None,
    }
    app = gate.RouteGate(_app, allowed, cidrs, key, metrics_public, route_file)
    asyncio.run(app(scope, receive, send))
    return (
        sent[0]["status"],
        b"".join(m.get("body", b"") for m in sent[1:]),
        dict(sent[0]["headers"]),
    )


@pytest.mark.parametrize("path", CLOSED)
def test_a_route_off_the_list_is_404_for_everyone(path):
    for client in ("192.168.1.20", "127.0.0.1"):  # an API client, the host itself
        for authorization in (None, f"Bearer {KEY}".encode()):
            status, body, _ = request(path, client, key=KEY, authorization=authorization)
            assert status == 404, (path, client, authorization)
            assert b"vllm:" not in body


@pytest.mark.parametrize("path", ALLOWED.split(","))
def test_without_a_key_every_listed_route_answers(path):
    assert request(path)[0] == 200


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
)
def test_with_a_key_listed_routes_need_it(path):
    status, body, headers = request(path, key=KEY)
    assert (status, headers[b"www-authenticate"]) == (401, b"Bearer")
    assert b"Unauthorized" in body
    for wrong in (
        b"Bearer wrong",
        b"Bearer " + KEY[:-1].encode(),
        KEY.encode(),
        b"Basic " + KEY.encode(),
        b"",
    ):
        assert request(path, key=KEY, authorization=wrong)[0] == 401, wrong
    assert request(path, key=KEY, authorization=f"Bearer {KEY}".encode())[0] == 200
    assert request(path, key=KEY, authorization=f"bearer {KEY}".encode())[0] == 200


@pytest.mark.parametrize("path", ["/health", "/ping", "/version"])
def test_health_ping_and_version_never_need_the_key(path):
    assert request(path, key=KEY)[0] == 200


def test_prefix_entries_allow_a_subtree_but_not_a_way_out():
    allowed = "/health,/v1/responses/*"
    assert request("/v1/responses/abc", allowed=allowed)[0] == 200
    assert request("/v1/responses", allowed=allowed)[0] == 404
    assert request("/v1/responses/../../tokenize", allowed=allowed)[0] == 404
    assert request("/v1/responsesx", allowed=allowed)[0] == 404


def test_a_websocket_off_the_list_is_closed_before_it_is_accepted():
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/realtime", "headers": [], "client": ("10.0.0.1", 1)}
    asyncio.run(gate.RouteGate(_app, ALLOWED, "", "", False, "/nonexistent")(scope, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_lifespan_passes_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(
        gate.RouteGate(app, ALLOWED, "", KEY, False, "/nonexistent")(
            {"type": "lifespan"}, None, None
        )
    )
    assert seen == ["lifespan"]


@pytest.mark.parametrize(
    ("client", "status"),
    [
        ("10.0.5.7", 200),  # the monitoring network
        ("::ffff:10.0.5.7", 200),  # IPv4 seen through a dual-stack socket
        ("fd00::5", 200),
        ("192.168.1.20", 403),  # an API client
        ("fd01::5", 403),
        (None, 403),  # no peer address (a Unix socket): not trusted
        ("not-an-address", 403),
    ],
)
def test_only_listed_networks_read_metrics(client, status):
    code, body, _ = request("/metrics", client, "10.0.5.0/24, 127.0.0.0/8,fd00::/64", key=KEY)
    assert code == status
    if status == 403:
        assert b"not served to this address" in body
    else:
        assert body.startswith(b"vllm:")


def test_public_metrics_are_served_to_anyone_but_only_on_the_exact_path():
    assert request("/metrics", metrics_public=True)[0] == 200
    assert request("/metricsx", metrics_public=True)[0] == 404


def test_the_host_itself_always_reads_metrics(routes):
    assert gate.default_gateway(routes) == "172.18.0.1"
    assert request("/metrics", "172.18.0.1", "", routes)[0] == 200  # host -> published port
    assert request("/metrics", "127.0.0.1", "", routes)[0] == 200  # inside the container
    assert request("/metrics", "::1", "", routes)[0] == 200
    assert request("/metrics", "172.18.0.5", "", routes)[0] == 403  # another container
    assert request("/metrics", "10.0.5.7", "", routes)[0] == 403


def test_no_route_table_means_no_gateway():
    assert gate.default_gateway("/nonexistent") is None


def test_the_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(gate.METRICS_CIDRS_ENV, "192.168.1.0/24")
    monkeypatch.setenv(gate.ROUTES_ENV, "/health, /v1/models")
    monkeypatch.setenv(gate.KEY_ENV, KEY)
    monkeypatch.setenv(gate.METRICS_PUBLIC_ENV, "0")

    async def noop(*_):
        return None

    made = gate.RouteGate(noop)
    assert made.allows(("192.168.1.20", 1))
    assert not made.allows(("10.0.5.7", 1))
    assert "/v1/models" in made.routes and "/tokenize" not in made.routes
    assert made.key == KEY.encode() and made.metrics_public is False

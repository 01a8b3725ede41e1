"""The route gate vLLM loads with --middleware: an allow-list, the key, /metrics by address."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

GATE = Path(__file__).resolve().parents[2] / "ansible/roles/vllm_service/files/servekit_gate.py"
spec = importlib.util.spec_from_file_location("servekit_gate", GATE)
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)

ALLOWED = [
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
    "/health",
    "/ping",
    "/version",
]
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


async def _noop(*_):
    return None


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


def write_settings(
    path: Path,
    allowed: list[str] = ALLOWED,
    cidrs: list[str] = (),
    key: str = "",
    metrics_public: bool = False,
) -> Path:
    """Write the gate's settings as the role does: a new file renamed over the old one."""
    settings = {
        "allowed_routes": list(allowed),
        "metrics_allowed_cidrs": list(cidrs),
        "metrics_public": metrics_public,
        "api_key": key,
    }
    new = path.with_suffix(".new")
    new.write_text(json.dumps(settings, indent=2) + "\n")
    new.replace(path)
    return path


def send_to(app, path: str, client: str | None = "192.168.1.20", authorization=None):
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
    asyncio.run(app(scope, receive, send))
    return (
        sent[0]["status"],
        b"".join(m.get("body", b"") for m in sent[1:]),
        dict(sent[0]["headers"]),
    )


def request(
    path: str,
    client: str | None = "192.168.1.20",
    cidrs: str = "",
    route_file: str = "/nonexistent",
    key: str = "",
    authorization: bytes | None = None,
    allowed: list[str] = ALLOWED,
    metrics_public: bool = False,
) -> tuple[int, bytes, dict]:
    """One request through a gate made for it (``cidrs`` comma separated)."""
    networks = [c for c in cidrs.split(",") if c.strip()]
    with tempfile.TemporaryDirectory() as directory:
        config = write_settings(
            Path(directory) / "gate.json", allowed, networks, key, metrics_public
        )
        app = gate.RouteGate(_app, str(config), route_file)
    return send_to(app, path, client, authorization)


@pytest.mark.parametrize("path", CLOSED)
def test_a_route_off_the_list_is_404_for_everyone(path):
    for client in ("192.168.1.20", "127.0.0.1"):  # an API client, the host itself
        for authorization in (None, f"Bearer {KEY}".encode()):
            status, body, _ = request(path, client, key=KEY, authorization=authorization)
            assert status == 404, (path, client, authorization)
            assert b"vllm:" not in body


@pytest.mark.parametrize("path", ALLOWED)
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
    allowed = ["/health", "/v1/responses/*"]
    assert request("/v1/responses/abc", allowed=allowed)[0] == 200
    assert request("/v1/responses", allowed=allowed)[0] == 404
    assert request("/v1/responses/../../tokenize", allowed=allowed)[0] == 404
    assert request("/v1/responsesx", allowed=allowed)[0] == 404


def test_a_websocket_off_the_list_is_closed_before_it_is_accepted(tmp_path):
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/realtime", "headers": [], "client": ("10.0.0.1", 1)}
    config = str(write_settings(tmp_path / "gate.json"))
    asyncio.run(gate.RouteGate(_app, config, "/nonexistent")(scope, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_lifespan_passes_through(tmp_path):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    config = str(write_settings(tmp_path / "gate.json", key=KEY))
    asyncio.run(gate.RouteGate(app, config, "/nonexistent")({"type": "lifespan"}, None, None))
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


def test_the_settings_file_is_the_one_the_environment_names(tmp_path, monkeypatch):
    config = write_settings(tmp_path / "gate.json", ["/health", " /v1/models"], ["192.168.1.0/24"])
    monkeypatch.setenv(gate.CONFIG_ENV, str(config))
    made = gate.RouteGate(_noop)
    assert made.allows(("192.168.1.20", 1))
    assert not made.allows(("10.0.5.7", 1))
    assert "/v1/models" in made.settings.routes and "/tokenize" not in made.settings.routes
    assert made.settings.key == b"" and made.settings.metrics_public is False


def test_a_changed_file_applies_on_the_next_request(tmp_path, routes):
    """A new key, allow-list or /metrics network: the same gate, no restart."""
    config = write_settings(tmp_path / "gate.json", key=KEY)
    app = gate.RouteGate(_app, str(config), routes)
    old, new = f"Bearer {KEY}".encode(), b"Bearer " + b"n" * 40
    assert send_to(app, "/v1/models", authorization=old)[0] == 200
    assert send_to(app, "/v1/embeddings", authorization=old)[0] == 404
    assert send_to(app, "/metrics", "10.0.5.7")[0] == 403

    write_settings(config, [*ALLOWED, "/v1/embeddings"], ["10.0.5.0/24"], "n" * 40)
    assert send_to(app, "/v1/models", authorization=old)[0] == 401
    assert send_to(app, "/v1/models", authorization=new)[0] == 200
    assert send_to(app, "/v1/embeddings", authorization=new)[0] == 200
    assert send_to(app, "/metrics", "10.0.5.7")[0] == 200
    assert send_to(app, "/metrics", "172.18.0.1")[0] == 200  # the host itself, still

    # Rewritten in place (same inode), the key removed: a different size, read again.
    settings = json.loads(config.read_text()) | {"api_key": ""}
    config.write_text(json.dumps(settings))
    assert send_to(app, "/v1/models")[0] == 200


@pytest.mark.parametrize(
    "bad",
    [
        '{"allowed_routes": ["/health"], "api_key": "' + "n" * 40,  # cut short mid-write
        json.dumps({"allowed_routes": ["/health"], "api_key": "n" * 40}),  # fields missing
        json.dumps(
            {
                "allowed_routes": ["/health"],
                "metrics_allowed_cidrs": ["10.0.5.0/33"],
                "metrics_public": False,
                "api_key": "n" * 40,
            }
        ),
        b"\xff\xfe" + b"n" * 40,
        None,  # removed
    ],
    ids=["truncated", "incomplete", "bad-network", "not-utf8", "removed"],
)
def test_a_bad_rewrite_keeps_the_settings_and_warns_once_without_the_key(tmp_path, caplog, bad):
    config = write_settings(tmp_path / "gate.json", key=KEY)
    app = gate.RouteGate(_app, str(config), "/nonexistent")
    if bad is None:
        config.unlink()
    else:
        config.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    with caplog.at_level(logging.WARNING, logger="servekit_gate"):
        for _ in range(3):
            assert send_to(app, "/v1/models", authorization=f"Bearer {KEY}".encode())[0] == 200
            assert send_to(app, "/v1/models", authorization=b"Bearer " + b"n" * 40)[0] == 401
    warnings = [r for r in caplog.records if r.name == "servekit_gate"]
    assert len(warnings) == 1, caplog.text
    assert str(config) in warnings[0].getMessage() and "keeps the settings" in caplog.text
    assert KEY not in caplog.text and "n" * 40 not in caplog.text

    write_settings(config, key="n" * 40)  # fixed: applies, without another warning
    assert send_to(app, "/v1/models", authorization=b"Bearer " + b"n" * 40)[0] == 200
    assert len([r for r in caplog.records if r.name == "servekit_gate"]) == 1


def test_a_missing_or_bad_file_at_start_stops_the_gate(tmp_path, monkeypatch):
    missing = tmp_path / "gate.json"
    with pytest.raises(gate.GateConfigError, match=f"cannot read {missing}: No such file"):
        gate.RouteGate(_noop, str(missing))
    missing.write_text(json.dumps({"allowed_routes": ["/health"], "api_key": KEY}))
    with pytest.raises(gate.GateConfigError, match="metrics_allowed_cidrs must be a list") as bad:
        gate.RouteGate(_noop, str(missing))
    assert KEY not in str(bad.value)
    monkeypatch.delenv(gate.CONFIG_ENV, raising=False)
    with pytest.raises(gate.GateConfigError, match=f"{gate.CONFIG_ENV} is not set"):
        gate.RouteGate(_noop)


def test_the_server_does_not_start_on_a_bad_file(tmp_path):
    """vLLM imports the gate before it serves: a bad file fails that import, with the reason."""
    config = tmp_path / "gate.json"
    config.write_text('{"api_key": "' + KEY)

    def load_the_gate():
        env = {**os.environ, gate.CONFIG_ENV: str(config), "PYTHONPATH": str(GATE.parent)}
        code = "import servekit_gate"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    failed = load_the_gate()
    assert failed.returncode != 0
    assert f"GateConfigError: {config} is not JSON" in failed.stderr
    assert KEY not in failed.stderr
    write_settings(config, key=KEY)
    assert load_the_gate().returncode == 0

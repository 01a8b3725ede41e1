"""The /metrics guard vLLM loads with --middleware: only listed networks read the metrics."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

GUARD = (
    Path(__file__).resolve().parents[2]
    / "ansible/roles/vllm_service/files/servekit_metrics_guard.py"
)
spec = importlib.util.spec_from_file_location("servekit_metrics_guard", GUARD)
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)


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
    path: str, client: str | None, cidrs: str, route_file: str = "/nonexistent"
) -> tuple[int, bytes]:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "client": (client, 51234) if client else None}
    asyncio.run(guard.MetricsGuard(_app, cidrs, route_file)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize(
    ("path", "client", "status"),
    [
        ("/metrics", "10.0.5.7", 200),  # the monitoring network
        ("/metrics", "::ffff:10.0.5.7", 200),  # IPv4 seen through a dual-stack socket
        ("/metrics", "fd00::5", 200),
        ("/metrics", "192.168.1.20", 403),  # an API client
        ("/metrics/", "192.168.1.20", 403),
        ("/metrics", "fd01::5", 403),
        ("/metrics", None, 403),  # no peer address (a Unix socket): not trusted
        ("/metrics", "not-an-address", 403),
        ("/v1/models", "192.168.1.20", 200),  # the API itself is not the guard's business
        ("/health", "192.168.1.20", 200),
        # vLLM serves the metrics on every path that starts with /metrics.
        ("/metricsfoo", "192.168.1.20", 403),
        ("/metricsfoo", "10.0.5.7", 200),
    ],
)
def test_only_listed_networks_read_metrics(path, client, status):
    code, body = request(path, client, "10.0.5.0/24, 127.0.0.0/8,fd00::/64")
    assert code == status
    if status == 403:
        assert b"not served to this address" in body
    else:
        assert body.startswith(b"vllm:")


def test_the_host_itself_always_reads_metrics(routes):
    assert guard.default_gateway(routes) == "172.18.0.1"
    assert request("/metrics", "172.18.0.1", "", routes)[0] == 200  # host -> published port
    assert request("/metrics", "127.0.0.1", "", routes)[0] == 200  # inside the container
    assert request("/metrics", "::1", "", routes)[0] == 200
    assert request("/metrics", "172.18.0.5", "", routes)[0] == 403  # another container
    assert request("/metrics", "10.0.5.7", "", routes)[0] == 403


def test_no_route_table_means_no_gateway():
    assert guard.default_gateway("/nonexistent") is None


def test_the_networks_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(guard.ENV, "192.168.1.0/24")

    async def noop(*_):
        return None

    assert guard.MetricsGuard(noop).allows(("192.168.1.20", 1))
    assert not guard.MetricsGuard(noop).allows(("10.0.5.7", 1))

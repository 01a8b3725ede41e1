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


def request(path: str, client: str | None, cidrs: str) -> tuple[int, bytes]:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "client": (client, 51234) if client else None}
    asyncio.run(guard.MetricsGuard(_app, cidrs)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize(
    ("path", "client", "status"),
    [
        ("/metrics", "10.0.5.7", 200),  # the monitoring network
        ("/metrics", "127.0.0.1", 200),
        ("/metrics", "::ffff:10.0.5.7", 200),  # IPv4 seen through a dual-stack socket
        ("/metrics", "fd00::5", 200),
        ("/metrics", "192.168.1.20", 403),  # an API client
        ("/metrics/", "192.168.1.20", 403),
        ("/metrics", "fd01::5", 403),
        ("/metrics", None, 403),  # no peer address (a Unix socket): not trusted
        ("/metrics", "not-an-address", 403),
        ("/v1/models", "192.168.1.20", 200),  # the API itself is not the guard's business
        ("/health", "192.168.1.20", 200),
        ("/metricsfoo", "192.168.1.20", 200),  # another route, vLLM answers 404 itself
    ],
)
def test_only_listed_networks_read_metrics(path, client, status):
    code, body = request(path, client, "10.0.5.0/24, 127.0.0.0/8,fd00::/64")
    assert code == status
    if status == 403:
        assert b"not served to this address" in body
    else:
        assert body.startswith(b"vllm:")


def test_an_empty_list_serves_metrics_to_nobody():
    assert request("/metrics", "127.0.0.1", "")[0] == 403


def test_the_networks_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(guard.ENV, "192.168.1.0/24")

    async def noop(*_):
        return None

    assert guard.MetricsGuard(noop).allows(("192.168.1.20", 1))
    assert not guard.MetricsGuard(noop).allows(("10.0.5.7", 1))

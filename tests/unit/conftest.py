"""Fixtures shared by the gateway and roll-out tests: two stand-in vLLM servers behind a real
HAProxy run from the gateway role's own configuration."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_backend import FakeBackend
from gateway_helpers import HAPROXY, Gateway, start_live_gateway


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, FakeBackend]]:
    servers = {name: FakeBackend(name).start() for name in ("b1", "b2")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory, backends) -> Iterator[Gateway]:
    """HAProxy over ``backends``; the gateway role's tests and the roll-out tests both use it."""
    assert HAPROXY is not None, "haproxy is not installed: run `make host-tools`"
    gateway = start_live_gateway(tmp_path_factory.mktemp("gateway"), backends)
    yield gateway
    gateway.stop()

"""Shared helpers for the sandbox: paths, the Docker client, progress lines with timings."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..checkout import repo_root

Progress = Callable[[str], object]

#: Seconds the Docker SDK waits on one API response. Builds and pushes can stay silent
#: for minutes (a big COPY, pip installing torch), so this is generous.
DOCKER_TIMEOUT_S = 1800


class SandboxError(RuntimeError):
    """Something the sandbox needs is missing or failed; the message says what to do."""


def state_dir() -> Path:
    """Where the sandbox keeps its state: ``$SERVEKIT_STATE_DIR`` or ``<repo>/.sandbox``."""
    env = os.environ.get("SERVEKIT_STATE_DIR")
    if env:
        return Path(env).resolve()
    return repo_root() / ".sandbox"


def cache_dir() -> Path:
    """Downloads and temporary build trees: ``<repo>/.cache`` (gitignored)."""
    return repo_root() / ".cache"


def docker_client(timeout: int = DOCKER_TIMEOUT_S):
    """A Docker SDK client for the local engine, or a SandboxError that says how to get one."""
    from docker.errors import DockerException

    import docker

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except DockerException as exc:
        raise SandboxError(
            f"the Docker engine is not reachable ({exc}); "
            "start it with scripts/ensure-host-tools.sh"
        ) from exc
    return client


def fmt_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def fmt_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit in ("B", "KB") else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


@contextmanager
def step(progress: Progress, what: str) -> Iterator[None]:
    """Print ``what…`` now and ``what: done in N s`` (or failed) when the block ends."""
    progress(f"{what}…")
    start = time.monotonic()
    try:
        yield
    except BaseException:
        progress(f"{what}: failed after {fmt_duration(time.monotonic() - start)}")
        raise
    progress(f"{what}: done in {fmt_duration(time.monotonic() - start)}")


def wait_until(check: Callable[[], object], what: str, timeout: float, interval: float = 0.2):
    """Call ``check()`` until it returns a truthy value (returned); raise SandboxError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SandboxError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 2.0):
    """``GET url``: the response, or None when nothing answers."""
    import requests

    try:
        return requests.get(url, timeout=timeout)
    except requests.RequestException:
        return None

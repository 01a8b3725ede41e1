"""Run the mirror as a process of its own: for the tests and benchmarks (a free loopback port,
stopped with the test) and for the sandbox (a fixed address, detached, stopped by its pid from
any later process)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_SERVING = re.compile(r"^serving (.+) on (http://\S+)\n", re.M)


class MirrorStartError(RuntimeError):
    """The mirror process did not come up healthy."""


@dataclass
class MirrorProcess:
    url: str
    root: Path  # the root as the mirror printed it (resolved)
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL (and re-raise) if it does not exit in time; its exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


#: The mirror is on this machine: ask it directly, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(url: str) -> bool:
    """True when the mirror at ``url`` answers ``/healthz`` with 200 (start-up hashing done)."""
    try:
        with _DIRECT.open(url + "/healthz", timeout=5) as resp:
            return resp.status == 200
    except OSError:  # refused, or 503 while the start-up hashing runs
        return False


def start_mirror(
    root: Path,
    log: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 20.0,
    ready_timeout: float = 20.0,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    detach: bool = False,
) -> MirrorProcess:
    """``python -m servekit.mirror ROOT --host HOST --port PORT``, returned once /healthz
    answers 200. Port 0 picks a free port.

    The mirror writes everything to ``log`` (appended). ``timeout`` bounds the wait for its
    "serving ROOT on URL" line, ``ready_timeout`` the start-up hashing after it. ``detach``
    starts it in a session of its own, so it outlives this process (stop it with
    :func:`stop_pid`).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        offset = out.tell()
        proc = subprocess.Popen(
            [python, "-m", "servekit.mirror", str(root), "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=detach,
        )

    def written() -> str:
        with log.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def failed(why: str) -> MirrorStartError:
        return MirrorStartError(f"{why}; {log}:\n{written()[-4000:]}")

    try:  # a mirror that is not up when this returns or raises is not left running
        deadline = time.monotonic() + timeout
        while not (match := _SERVING.search(written())):
            if proc.poll() is not None:
                raise failed(f"the mirror exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise failed(f"the mirror printed no 'serving' line within {timeout:.0f} s")
            time.sleep(0.05)
        url = match.group(2)
        deadline = time.monotonic() + ready_timeout
        while not healthy(url):
            if proc.poll() is not None:
                raise failed(f"the mirror exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise failed(f"{url}/healthz did not answer 200 within {ready_timeout:.0f} s")
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return MirrorProcess(url=url, root=Path(match.group(1)), proc=proc, log=log)


def is_mirror(pid: int) -> bool:
    """True when ``pid`` is a live (not zombie) ``servekit.mirror`` process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and b"servekit" in cmdline and b"mirror" in cmdline


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the mirror ``pid`` (started by any process), SIGKILL after ``timeout``; reaped
    when it is a child of this process."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    _reap(pid, block=True)


def _running(pid: int) -> bool:
    _reap(pid, block=False)
    return is_mirror(pid)


def _reap(pid: int, *, block: bool) -> None:
    """Collect ``pid``'s exit status if it is a child of this process (else nothing)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0 if block else os.WNOHANG)

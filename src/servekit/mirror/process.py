"""Run the mirror as a child process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_SERVING = re.compile(r"serving (.+) on (http://127\.0\.0\.1:\d+)\n")


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


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
            return resp.status == 200
    except OSError:  # refused, or 503 while the start-up hashing runs
        return False


def start_mirror(
    root: Path, log: Path, *, timeout: float = 20.0, ready_timeout: float = 20.0
) -> MirrorProcess:
    """``python -m servekit.mirror ROOT --port 0``, returned once /healthz answers 200.

    ``timeout`` bounds the wait for the "serving ROOT on URL" line, ``ready_timeout`` the
    start-up hashing after it. stderr goes to ``log``.
    """
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "servekit.mirror", str(root), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise MirrorStartError(f"mirror printed nothing; log:\n{log.read_text()}") from None
    match = _SERVING.fullmatch(line)
    if not match:
        proc.kill()
        raise MirrorStartError(f"mirror did not start: {line!r}; log:\n{log.read_text()}")
    mirror = MirrorProcess(url=match.group(2), root=Path(match.group(1)), proc=proc, log=log)
    deadline = time.monotonic() + ready_timeout
    while not _healthy(mirror.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise MirrorStartError(f"mirror never became healthy; log:\n{log.read_text()}")
        time.sleep(0.05)
    return mirror

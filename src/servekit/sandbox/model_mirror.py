"""The sandbox's model mirror: ``servekit.mirror`` serving ``.sandbox/mirror`` on the bridge
gateway, port 8090, with the generated test model under ``Qwen/Qwen3-8B``.

It is started by ``servekit.mirror.process`` in a session of its own, so it outlives ``up()``;
its pid goes to ``.sandbox/mirror.pid``, where ``down()`` (any later process) finds it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from ..checkout import repo_root
from ..mirror.process import MirrorStartError, healthy, is_mirror, start_mirror, stop_pid
from .common import Progress, SandboxError, fmt_duration
from .state import SandboxPaths

MIRROR_PORT = 8090
#: Seconds for the mirror to print where it serves, and then to answer /healthz.
START_TIMEOUT_S = 60


def mirror_url(gateway: str) -> str:
    """Where the mirror answers on this machine (the sandbox hosts say servekit-control)."""
    return f"http://{gateway}:{MIRROR_PORT}"


def running_pid(paths: SandboxPaths) -> int | None:
    """The pid of the mirror this sandbox started, if it still runs."""
    try:
        pid = int(paths.mirror_pid.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_mirror(pid) else None


def ensure_mirror(paths: SandboxPaths, gateway: str, progress: Progress) -> int:
    """The mirror's pid once it answers on the bridge gateway (started unless it runs)."""
    ensure_test_model(paths, progress)
    url = mirror_url(gateway)
    pid = running_pid(paths)
    if pid is not None:
        if healthy(url):
            progress(f"  mirror already running (pid {pid})")
            return pid
        stop_mirror(paths, progress)
    elif healthy(url):
        raise SandboxError(
            f"something already answers on {url} that this sandbox did not start "
            f"(no live pid in {paths.mirror_pid}); stop it and run up again"
        )
    env = dict(os.environ)
    src = str(repo_root() / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    try:
        mirror = start_mirror(
            paths.mirror_root,
            paths.mirror_log,
            host=gateway,
            port=MIRROR_PORT,
            timeout=START_TIMEOUT_S,
            ready_timeout=START_TIMEOUT_S,
            python=_python(),
            env=env,
            cwd=repo_root(),
            detach=True,
        )
    except MirrorStartError as exc:
        raise SandboxError(str(exc)) from None
    paths.mirror_pid.write_text(f"{mirror.proc.pid}\n")
    return mirror.proc.pid


def stop_mirror(paths: SandboxPaths, progress: Progress) -> None:
    pid = running_pid(paths)
    if pid is not None:
        stop_pid(pid)
        progress(f"  mirror stopped (pid {pid})")
    paths.mirror_pid.unlink(missing_ok=True)


def ensure_test_model(paths: SandboxPaths, progress: Progress) -> None:
    """Generate the tiny test model into the mirror, unless it is there."""
    if (paths.model / "config.json").is_file():
        return
    from servekit import testmodel

    partial = paths.model.with_name(paths.model.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    testmodel.generate(partial)
    if paths.model.exists():
        shutil.rmtree(paths.model)
    partial.rename(paths.model)
    progress(f"  test model generated in {paths.model} ({fmt_duration(time.monotonic() - t0)})")


def _python() -> str:
    """The checkout's virtualenv Python, where the mirror's dependencies are installed."""
    venv = repo_root() / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable

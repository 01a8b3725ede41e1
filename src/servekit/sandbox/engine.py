"""Make sure a Docker engine answers on this machine (the sandbox runs on it).

Same logic as ``scripts/ensure-host-tools.sh`` (for use before the virtualenv exists): if the
engine does not answer, install Debian's ``docker.io`` when ``dockerd`` is missing, then
start the daemon (``systemctl start docker`` where systemd runs, otherwise ``dockerd`` in
the background, logging to /var/log/servekit-dockerd.log) and wait until it answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from .common import Progress, SandboxError, fmt_duration

DOCKERD_LOG = Path("/var/log/servekit-dockerd.log")
DOCKERD_PIDFILE = Path("/var/run/docker.pid")


def engine_ready() -> bool:
    """True when the Docker engine (``DOCKER_HOST`` or the local socket) answers."""
    from docker.errors import DockerException

    import docker

    try:
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except DockerException:
        return False


def _dockerd_running() -> bool:
    try:
        pid = int(DOCKERD_PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"dockerd" in cmdline


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_docker_engine(progress: Progress = print, *, timeout: float = 60) -> None:
    """Return once the Docker engine answers; install and start it if needed (needs root)."""
    if engine_ready():
        return
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host and not docker_host.startswith("unix://"):
        raise SandboxError(
            f"DOCKER_HOST={docker_host} does not answer (only a local engine is started)"
        )
    if os.geteuid() != 0:
        raise SandboxError(
            "the Docker engine is not running, and installing or starting it needs root: "
            "run `sudo scripts/ensure-host-tools.sh` (or start Docker yourself)"
        )
    start = time.monotonic()
    if shutil.which("dockerd") is None:
        progress("installing Debian's docker.io (apt-get)…")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "docker.io"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
                raise SandboxError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
        progress(f"docker.io installed ({fmt_duration(time.monotonic() - start)})")
    if Path("/run/systemd/system").is_dir():
        progress("starting docker.service…")
        proc = subprocess.run(["systemctl", "start", "docker"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SandboxError(f"`systemctl start docker` failed: {proc.stderr.strip()}")
    elif not _dockerd_running():
        progress(f"starting dockerd (log: {DOCKERD_LOG})…")
        with open(DOCKERD_LOG, "ab") as log:
            subprocess.Popen(
                ["dockerd"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    deadline = time.monotonic() + timeout
    while not engine_ready():
        if time.monotonic() > deadline:
            raise SandboxError(
                f"the Docker engine did not answer within {timeout:.0f} s; "
                f"{DOCKERD_LOG}:\n{_tail(DOCKERD_LOG)}"
            )
        time.sleep(0.5)
    progress(f"Docker engine ready ({fmt_duration(time.monotonic() - start)})")

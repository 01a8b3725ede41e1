"""What the benchmark phases share: settings, logs, the sandbox endpoint and vLLM started by hand.

The sandbox helpers of the end-to-end tests (``tests/e2e/sandbox_helpers.py``: commands on the
host container, /health, the unit's identity) are used as they are, so the benchmark breaks and
heals the server exactly as the fault suite does (``python -m benchmarks.bench`` runs from the
checkout, where ``tests`` is importable).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e import sandbox_helpers as sandbox

from . import bench_ansible, bench_host

#: Start-up budget of one vLLM start (the sandbox allows vllm_service_start_timeout = 600 s).
START_BUDGET_S = 600


@dataclass
class Context:
    logs: Path  # where ansible-playbook, verify and model_supply logs go
    runs: int | None = None  # --runs: overrides every phase's default
    quick: bool = False
    url: str | None = None  # --url: serving smoke against this endpoint instead of the sandbox
    model: str = "Qwen3-8B"
    api_key: str | None = None
    max_tokens: int = 128
    start: float = field(default_factory=time.monotonic)
    #: Seconds of vLLM started by hand (the cold-start floor), shared by the phases that need it.
    hand_starts: list[float] = field(default_factory=list)
    #: ``systemctl start vllm``: (seconds to /health 200, seconds until systemctl returned).
    unit_starts: list[tuple[float, float]] = field(default_factory=list)
    #: The same, with vLLM's compile cache emptied first (what a first start pays).
    unit_starts_empty_cache: list[tuple[float, float]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Errors of the running phase that did not stop it (its figures are kept).
    errors: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    vllm_version: str | None = None

    def runs_for(self, default: int) -> int:
        if self.quick:
            return 1
        return self.runs or default

    def say(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)

    def progress(self, message: str) -> None:
        """Progress lines of the sandbox manager, indented under the phase's own."""
        print(f"        {message}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def error(self, text: str) -> None:
        self.say(f"ERROR: {text}")
        self.errors.append(text)

    def figure_of(self, phase: str, name: str) -> dict[str, Any] | None:
        return (self.results.get(phase) or {}).get("figures", {}).get(name)


# --- the sandbox endpoint --------------------------------------------------------------------


def wait_healthy(what: str, timeout: float = START_BUDGET_S) -> float:
    return bench_host.poll(sandbox.healthy, what, timeout, 0.2)


def wait_started(what: str, timeout: float = START_BUDGET_S) -> float:
    """Healthy, and vllm.service has finished starting: /health answers before the unit's
    readiness wait returns, and the health timer leaves a unit that is still starting alone."""
    return bench_host.poll(sandbox.started_and_healthy, what, timeout, 0.2)


def ensure_deployed(ctx: Context) -> None:
    """A converged, healthy sandbox host 1 (deployed now, unmeasured, when there is none)."""
    from servekit.sandbox import manager
    from servekit.sandbox.state import load_state

    state = load_state()
    if state and any(h.index == 1 for h in state.hosts) and sandbox.healthy():
        return
    ctx.say("no healthy sandbox endpoint: bringing the sandbox up and deploying (not measured)")
    manager.up(hosts=max(1, len(state.hosts) if state else 1), progress=ctx.progress)
    bench_ansible.run_playbook(ctx.logs / "setup-deploy.log").check()
    wait_healthy("the endpoint after the set-up deploy")


def host_cmd(*args: str, what: str, timeout: float | None = 120) -> str:
    """A command on sandbox host 1; its stdout (RuntimeError when it fails)."""
    return bench_host.must(
        bench_host.docker_exec(sandbox.HOST_CONTAINER, *args, timeout=timeout), what
    )


def stop_vllm() -> None:
    """Stop the unit and clear its start count: the benchmark starts it more often than the
    crash-loop brake (StartLimitBurst in StartLimitIntervalSec) allows, as the role's restart
    handler does before a restart."""
    host_cmd("systemctl", "stop", "vllm.service", what="systemctl stop vllm", timeout=120)
    host_cmd("systemctl", "reset-failed", "vllm.service", what="systemctl reset-failed vllm")
    bench_host.poll(lambda: not sandbox.healthy(), "/health down after the stop", 60, 0.2)


def start_vllm_if_stopped() -> None:
    state = bench_host.docker_exec(sandbox.HOST_CONTAINER, "systemctl", "is-active", "vllm")
    if state.stdout.strip() != "active":
        host_cmd("systemctl", "reset-failed", "vllm.service", what="systemctl reset-failed vllm")
        host_cmd("systemctl", "start", "vllm", what="systemctl start vllm", timeout=START_BUDGET_S)
    wait_healthy("the endpoint after the unit's start")


def unit_argv() -> list[str]:
    """The ``docker run`` of vllm.service on host 1."""
    unit = host_cmd("systemctl", "cat", "vllm.service", what="systemctl cat vllm")
    return bench_host.exec_start_argv(unit)


def empty_compile_cache(argv: list[str]) -> None:
    """Empty the host directory the unit keeps vLLM's compile cache in (the server stopped)."""
    cache = bench_host.compile_cache_dir(argv)
    if not cache:
        raise RuntimeError("vllm.service keeps no compile cache (vllm_service_compile_cache_dir)")
    host_cmd("find", cache, "-mindepth", "1", "-delete", what=f"empty the compile cache {cache}")


def hand_start(ctx: Context, empty_cache: bool = False) -> float:
    """vLLM started by hand on host 1: the unit's own ``docker run`` (same image, flags, model,
    port, compile cache), detached, under another name, with the unit stopped. Seconds from
    ``docker run`` to the first /health 200 seen from this machine; the unit is left stopped.
    ``empty_cache``: empty the compile cache first (a first start) and keep the figure out of
    ``ctx.hand_starts``."""
    unit = unit_argv()
    argv = bench_host.hand_start_argv(unit)
    stop_vllm()
    if empty_cache:
        empty_compile_cache(unit)
    bench_host.docker_exec(sandbox.HOST_CONTAINER, "docker", "rm", "-f", bench_host.HAND_CONTAINER)
    try:
        start = time.monotonic()
        host_cmd(*argv, what="docker run (vLLM by hand)", timeout=300)
        wait_healthy("vLLM started by hand")
        seconds = time.monotonic() - start
    finally:
        bench_host.docker_exec(
            sandbox.HOST_CONTAINER, "docker", "rm", "-f", bench_host.HAND_CONTAINER, timeout=120
        )
    bench_host.poll(lambda: not sandbox.healthy(), "/health down after removing it", 60, 0.2)
    if not empty_cache:
        ctx.hand_starts.append(round(seconds, 3))
    return seconds


def unit_start(ctx: Context, empty_cache: bool = False) -> tuple[float, float]:
    """``systemctl start vllm`` on host 1 with the unit stopped: seconds to the first /health 200
    seen from this machine, and seconds until systemctl returned (it waits for the unit's
    readiness check). ``empty_cache``: empty the compile cache first (a first start); the
    figures go to ``ctx.unit_starts_empty_cache``."""
    stop_vllm()
    if empty_cache:
        empty_compile_cache(unit_argv())
    start = time.monotonic()
    proc = subprocess.Popen(
        ["docker", "exec", sandbox.HOST_CONTAINER, "systemctl", "start", "vllm.service"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy("/health after systemctl start")
        health = time.monotonic() - start
        _, err = proc.communicate(timeout=START_BUDGET_S)
        returned = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"systemctl start vllm failed ({proc.returncode}): {err.strip()}")
    starts = ctx.unit_starts_empty_cache if empty_cache else ctx.unit_starts
    starts.append((round(health, 3), round(returned, 3)))
    return health, returned

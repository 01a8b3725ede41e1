"""Phases of the running service: cold start, recovery from faults, the serving smoke, and the
model supply benchmark (``benchmarks/model_supply.py``) merged in.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import bench_ansible as ba
from . import bench_host as bh
from . import bench_serving as bs
from .bench_context import (
    Context,
    ensure_deployed,
    hand_start,
    host_cmd,
    sandbox,
    start_vllm_if_stopped,
    unit_start,
    wait_healthy,
    wait_started,
)
from .bench_report import figure, ratio

MODEL_SUPPLY = Path(__file__).resolve().parent / "model_supply.py"

# --- cold start ------------------------------------------------------------------------------


def cold_start(ctx: Context) -> dict[str, Any]:
    """The unit's start against vLLM started by hand, alternating (the health timer is paused),
    both with the compile cache an earlier start left; then the unit's start with that cache
    emptied (a first start), for the share of a start the kept cache saves.

    Starts measured earlier in the same run (the unit's start after the fresh converge's floor)
    count as runs here."""
    ensure_deployed(ctx)
    runs = ctx.runs_for(3)
    host_cmd("systemctl", "stop", "vllm-health.timer", what="pause the health timer")
    try:
        while len(ctx.hand_starts) < runs or len(ctx.unit_starts) < runs:
            if len(ctx.hand_starts) < runs:
                seconds = hand_start(ctx)
                ctx.say(f"vLLM by hand (run {len(ctx.hand_starts)}): healthy after {seconds:.1f} s")
            if len(ctx.unit_starts) < runs:
                h, r = unit_start(ctx)
                ctx.say(
                    f"systemctl start vllm (run {len(ctx.unit_starts)}): healthy after {h:.1f} s, "
                    f"returned {r:.1f} s"
                )
        while len(ctx.unit_starts_empty_cache) < runs:
            h, _ = unit_start(ctx, empty_cache=True)
            n = len(ctx.unit_starts_empty_cache)
            ctx.say(f"systemctl start vllm, compile cache emptied (run {n}): healthy in {h:.1f} s")
    finally:
        bh.docker_exec(sandbox.HOST_CONTAINER, "docker", "rm", "-f", bh.HAND_CONTAINER)
        start_vllm_if_stopped()
        host_cmd("systemctl", "start", "vllm-health.timer", what="resume the health timer")
    figures = {
        "unit_start_to_health_s": figure([h for h, _ in ctx.unit_starts], "s"),
        "unit_start_returns_s": figure([r for _, r in ctx.unit_starts], "s"),
        "hand_start_to_health_s": figure(ctx.hand_starts, "s"),
        "unit_start_empty_cache_to_health_s": figure(
            [h for h, _ in ctx.unit_starts_empty_cache], "s"
        ),
    }
    figures["server_share"] = ratio(
        figures["hand_start_to_health_s"],
        figures["unit_start_to_health_s"],
        "hand_start_to_health_s / unit_start_to_health_s",
    )
    figures["kept_cache_share"] = ratio(
        figures["unit_start_to_health_s"],
        figures["unit_start_empty_cache_to_health_s"],
        "unit_start_to_health_s / unit_start_empty_cache_to_health_s",
    )
    return figures


# --- recovery --------------------------------------------------------------------------------


#: vllm.service stops its container with ``docker stop --time 30``: a frozen server ignores
#: SIGTERM, so its restart waits this long before the kill and the new start.
STOP_TIMEOUT_S = 30


def health_window() -> int:
    """Longest time the health timer may take to notice a frozen server (role defaults)."""
    interval = int(ba.role_setting("vllm_service", "vllm_service_health_interval"))
    timeout = int(ba.role_setting("vllm_service", "vllm_service_health_timeout"))
    failures = int(ba.role_setting("vllm_service", "vllm_service_health_failures"))
    return interval * (failures + 1) + timeout * failures


def sigkill_once() -> tuple[float, float]:
    before = sandbox.vllm_identity()
    start = time.monotonic()
    host_cmd("docker", "kill", "--signal", "KILL", "vllm", what="docker kill -s KILL vllm")
    bh.poll(lambda: not sandbox.healthy(), "/health fails after SIGKILL", 30, 0.1)
    detected = time.monotonic() - start
    wait_healthy("healthy again after SIGKILL")
    healthy = time.monotonic() - start
    if sandbox.vllm_identity()[1] == before[1]:
        raise RuntimeError("the same container serves after SIGKILL")
    return detected, healthy


def sigstop_once(window: int) -> tuple[float, float]:
    before = sandbox.vllm_identity()
    pid = host_cmd("docker", "inspect", "--format", "{{.State.Pid}}", "vllm", what="pid").strip()
    start = time.monotonic()
    host_cmd("kill", "-STOP", pid, what="kill -STOP")
    bh.poll(
        lambda: sandbox.vllm_identity()[0] != before[0],
        "the health timer restarts the frozen server",
        window + STOP_TIMEOUT_S + 60,
        0.5,
    )
    detected = time.monotonic() - start
    wait_healthy("healthy again after the freeze")
    return detected, time.monotonic() - start


def recovery(ctx: Context) -> dict[str, Any]:
    """SIGKILL of the container -> healthy; SIGSTOP of the server -> restarted -> healthy."""
    ensure_deployed(ctx)
    host_cmd("systemctl", "start", "vllm-health.timer", what="health timer on")
    window = health_window()
    kill_d, kill_h, stop_d, stop_h = [], [], [], []
    for i in range(ctx.runs_for(1)):
        wait_started("started and healthy before SIGKILL")
        d, h = sigkill_once()
        kill_d.append(d)
        kill_h.append(h)
        ctx.say(f"SIGKILL (run {i + 1}): /health failed after {d:.1f} s, healthy after {h:.1f} s")
        wait_started("started and healthy before SIGSTOP")
        d, h = sigstop_once(window)
        stop_d.append(d)
        stop_h.append(h)
        ctx.say(f"SIGSTOP (run {i + 1}): restarted after {d:.1f} s, healthy after {h:.1f} s")
    ctx.details["recovery"] = {"health_timer_window_s": window, "stop_timeout_s": STOP_TIMEOUT_S}
    return {
        "sigkill_detected_s": figure(kill_d, "s", note="/health stops answering"),
        "sigkill_healthy_s": figure(kill_h, "s"),
        "sigstop_detected_s": figure(
            stop_d,
            "s",
            aim=f"<= {window + STOP_TIMEOUT_S} s",
            note="the unit's InvocationID changes: frozen server noticed, stopped, started again",
        ),
        "sigstop_healthy_s": figure(stop_h, "s"),
    }


# --- serving smoke ---------------------------------------------------------------------------


def serving(ctx: Context) -> dict[str, Any]:
    """TTFT and output tokens/s at concurrency 1 and 16 (on CPU this shows the harness works)."""
    url = ctx.url or sandbox.BASE_URL
    if not ctx.url:
        ensure_deployed(ctx)
    ctx.vllm_version = ctx.vllm_version or bs.server_version(url)
    key, tokens = ctx.api_key, ctx.max_tokens
    bs.stream_once(url, ctx.model, 8, api_key=key)  # warm-up, not counted
    runs = ctx.runs_for(3)
    c1 = [bs.stream_once(url, ctx.model, tokens, api_key=key) for _ in range(runs * 4)]
    ttft16, decode16, aggregate = [], [], []
    for _ in range(runs):
        streams, wall = bs.concurrent(url, ctx.model, tokens, 16, api_key=key)
        ttft16 += [s.ttft for s in streams]
        decode16 += [r for s in streams if (r := s.decode_tokens_per_s)]
        aggregate.append(bs.aggregate_tokens_per_s(streams, wall))
    decode1 = [r for s in c1 if (r := s.decode_tokens_per_s)]
    ctx.details["serving"] = {"url": url, "model": ctx.model, "max_tokens": tokens}
    figures = {
        "ttft_c1_s": figure([s.ttft for s in c1], "s"),
        "decode_tokens_per_s_c1": figure(decode1 or [0.0], "tok/s", note=_bunched(decode1, c1)),
        "ttft_c16_s": figure(ttft16, "s"),
        "decode_tokens_per_s_c16_per_stream": figure(
            decode16 or [0.0], "tok/s", note=_bunched(decode16, [None] * 16 * runs)
        ),
        "output_tokens_per_s_c1": figure(
            [t for s in c1 if (t := s.tokens_per_s)], "tok/s", note="one stream, request to end"
        ),
        "output_tokens_per_s_c16": figure(aggregate, "tok/s", note="all 16 streams together"),
    }
    figures["c16_vs_c1_output"] = ratio(
        figures["output_tokens_per_s_c16"],
        figures["output_tokens_per_s_c1"],
        "output_tokens_per_s_c16 / output_tokens_per_s_c1",
    )
    return figures


def _bunched(rates: list, streams: list) -> str | None:
    """Say how many streams delivered their text in bursts (no decode rate measurable)."""
    missing = len(streams) - len(rates)
    return f"{missing} of {len(streams)} streams arrived in bursts, left out" if missing else None


# --- model supply ----------------------------------------------------------------------------


def _slug(label: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "", label)


def model_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a ``model_supply.py`` report (MB/s per run from its seconds)."""
    t = report["throughput"]
    size = t["file_bytes"]
    figures: dict[str, Any] = {}
    for key, clients in (
        ("raw_loopback", 1),
        ("mirror_curl", 1),
        ("mirror_sdk", 1),
        ("mirror_sdk_4_clients", 4),
    ):
        runs = t[key]["seconds"]["runs"]
        figures[f"{key}_mb_per_s"] = figure([clients * size / 1e6 / s for s in runs], "MB/s")
    raw = figures["raw_loopback_mb_per_s"]
    for key in ("mirror_curl", "mirror_sdk", "mirror_sdk_4_clients"):
        figures[f"{key}_vs_raw"] = ratio(figures[f"{key}_mb_per_s"], raw, f"{key} / raw_loopback")
    rows = report["rerun"]
    for row in rows:
        slug = _slug(row["label"])
        for key in ("module_quick", "module_deep", "sdk_rehash"):
            figures[f"rerun_{slug}_{key}_s"] = figure(row[key]["runs"], "s")
    if len(rows) >= 2:
        small, big = _slug(rows[0]["label"]), _slug(rows[-1]["label"])
        figures[f"rerun_quick_{big}_vs_{small}"] = ratio(
            figures[f"rerun_{big}_module_quick_s"],
            figures[f"rerun_{small}_module_quick_s"],
            "quick re-run time does not grow with the model (aim ~1)",
        )
        figures[f"rerun_{big}_sdk_rehash_vs_quick"] = ratio(
            figures[f"rerun_{big}_sdk_rehash_s"],
            figures[f"rerun_{big}_module_quick_s"],
            "the SDK's full re-hash over servekit's manifest check",
        )
    return figures


def model(ctx: Context) -> dict[str, Any]:
    """``benchmarks/model_supply.py`` (1 GiB throughput; re-runs over 10 MiB, 1 GiB, 4 GiB)."""
    out = ctx.logs / "model-supply.json"
    cmd = [sys.executable, str(MODEL_SUPPLY), str(out)]
    if ctx.quick:
        cmd.append("--quick")
    elif ctx.runs:
        cmd += ["--runs", str(ctx.runs)]
    log = ctx.logs / "model-supply.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"model_supply.py failed (exit {proc.returncode}; log {log}):\n{tail}")
    report = json.loads(out.read_text())
    ctx.details["model"] = {"report": report}
    return model_figures(report)

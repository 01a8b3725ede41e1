#!/usr/bin/env python3
"""`make bench`: what operating servekit costs in time, as ratios against the floor.

    .venv/bin/python -m benchmarks.bench [--runs N] [--only a,b] [--skip a,b] [--out FILE]
                                         [--url URL --model NAME] [--quick] [--list]

Phases (in this order; ``--list`` shows them with their default runs and rough cost):

- ``fresh_converge``: a fresh sandbox host to a healthy endpoint with site.yml, per phase
  (preflight, docker engine, image, model, service start) next to each phase's floor, the same
  work done by hand; converge time / sum of floors. Once by default (it replaces the host).
- ``reconverge``: site.yml on the healthy host with nothing to change: wall time, changed tasks.
- ``cold_start``: ``systemctl start vllm`` to the first /health 200, the server's own share
  of it (the unit's ``docker run`` started by hand), and the share the kept compile cache saves
  (the same start with the cache emptied).
- ``recovery``: SIGKILL of the container -> healthy; SIGSTOP of the server -> restarted -> healthy.
- ``serving``: time to first token and output tokens/s at concurrency 1 and 16 (``--url``: any
  vLLM endpoint, e.g. a GPU host; then nothing touches the sandbox).
- ``verify``: run_verify on one host and on three in parallel (converges two more hosts).
- ``model``: benchmarks/model_supply.py (mirror throughput, model role re-runs), merged in.

Every figure has min, median and max over its runs; ratios divide medians measured in the same
run of this script. The report (``--out``, default reports/bench.json) is rewritten after every
phase; logs go to a ``bench/`` directory beside it. The sandbox is left with one converged host.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import bench_ansible, bench_converge, bench_report, bench_runtime
from .bench_context import Context
from .bench_serving import server_version

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[Context], dict[str, Any]]
    default_runs: int
    minutes: float  # rough cost on a 2-core machine with the default runs
    sandbox: bool = True
    what: str = ""


PHASES: tuple[Phase, ...] = (
    Phase(
        "fresh_converge",
        bench_converge.fresh_converge,
        1,
        5.5,
        what="fresh host -> healthy endpoint, per phase vs floors (1 run: it is expensive)",
    ),
    Phase(
        "reconverge",
        bench_converge.reconverge,
        3,
        1.5,
        what="site.yml on a healthy host: wall time, changed tasks",
    ),
    Phase(
        "cold_start",
        bench_runtime.cold_start,
        3,
        6.0,
        what="systemctl start vllm -> /health 200, vs vLLM started by hand and an emptied cache",
    ),
    Phase(
        "recovery",
        bench_runtime.recovery,
        1,
        3.5,
        what="SIGKILL -> healthy; SIGSTOP -> restarted -> healthy (1 run: each waits minutes)",
    ),
    Phase(
        "serving",
        bench_runtime.serving,
        3,
        0.5,
        what="TTFT and output tokens/s at concurrency 1 and 16",
    ),
    Phase(
        "verify",
        bench_converge.verify,
        3,
        6.5,
        what="verify 1 host vs 3 hosts in parallel (converges 2 more hosts first)",
    ),
    Phase(
        "model",
        bench_runtime.model,
        3,
        4.0,
        sandbox=False,
        what="mirror throughput (1 GiB), model role re-runs over 10 MiB / 1 GiB / 4 GiB",
    ),
)
BY_NAME = {p.name: p for p in PHASES}


def select(only: str | None, skip: str | None) -> list[Phase]:
    def names(value: str | None) -> list[str]:
        out = [n.strip() for n in (value or "").split(",") if n.strip()]
        unknown = [n for n in out if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown phase(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        return out

    chosen, skipped = names(only), set(names(skip))
    return [p for p in PHASES if (not chosen or p.name in chosen) and p.name not in skipped]


def plan(phases: list[Phase], ctx: Context) -> str:
    lines = [f"{'phase':<15} {'runs':>4} {'~min':>5}  what"]
    total = 0.0
    for p in phases:
        runs = ctx.runs_for(p.default_runs)
        minutes = p.minutes * (runs / p.default_runs if p.name != "fresh_converge" else 1)
        if p.name == "serving" and ctx.url:
            minutes = 0.5
        total += minutes
        lines.append(f"{p.name:<15} {runs:>4} {minutes:>5.1f}  {p.what}")
    lines.append(
        f"{'total':<15} {'':>4} {total:>5.1f}  (rough, 2 cores; sandbox image builds extra)"
    )
    return "\n".join(lines)


def settings(args: argparse.Namespace, phases: list[Phase], ctx: Context) -> dict[str, Any]:
    return {
        "argv": sys.argv[1:],
        "phases": [p.name for p in phases],
        "runs": {p.name: ctx.runs_for(p.default_runs) for p in phases},
        "quick": ctx.quick,
        "serving": {"url": ctx.url, "model": ctx.model, "max_tokens": ctx.max_tokens},
        "ansible_cfg": bench_ansible.ansible_settings(),
    }


def run_phase(phase: Phase, ctx: Context) -> dict[str, Any]:
    ctx.notes, ctx.errors = [], []
    start = time.monotonic()
    entry: dict[str, Any] = {"runs_default": phase.default_runs}
    try:
        entry["figures"] = phase.run(ctx)
    except Exception as exc:  # a failed phase must not lose the others
        entry["figures"] = {}
        ctx.errors.append(f"{type(exc).__name__}: {exc}")
        trace = ctx.logs / f"{phase.name}.error.log"
        trace.write_text(traceback.format_exc())
        ctx.say(f"{phase.name} FAILED: {exc} (traceback in {trace})")
    entry["seconds"] = round(time.monotonic() - start, 1)
    if ctx.errors:
        entry["error"] = "; ".join(ctx.errors)
    if ctx.notes:
        entry["notes"] = list(ctx.notes)
    if phase.name in ctx.details:
        entry["details"] = ctx.details[phase.name]
    return entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    parser.add_argument("--runs", type=int, help="runs of every phase (default: per phase)")
    parser.add_argument("--only", help="comma-separated phases to run")
    parser.add_argument("--skip", help="comma-separated phases to leave out")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one run each and small model sizes: checks the harness, not figures",
    )
    parser.add_argument("--url", help="serving smoke against this vLLM endpoint (not the sandbox)")
    parser.add_argument("--model", default="Qwen3-8B", help="served model name (default Qwen3-8B)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per serving request")
    parser.add_argument("--list", action="store_true", help="show the phases and exit")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = select(args.only, args.skip)
    logs = args.out.parent / "bench"
    ctx = Context(
        logs=logs,
        runs=args.runs,
        quick=args.quick,
        url=args.url,
        model=args.model,
        api_key=os.environ.get("SERVEKIT_API_KEY") or None,
        max_tokens=args.max_tokens,
    )
    print(plan(phases, ctx))
    if args.list:
        return 0
    if not phases:
        print("no phase selected")
        return 2
    if args.url and any(p.sandbox and p.name != "serving" for p in phases):
        print("note: --url applies to the serving smoke; the other phases use the sandbox")
    logs.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    revision = bench_report.git_revision(ROOT)
    results: dict[str, dict[str, Any]] = ctx.results

    def write(complete: bool) -> dict[str, Any]:
        url = ctx.url or (None if ctx.vllm_version is None else "http://localhost:8000")
        doc = bench_report.report(
            results,
            bench_report.machine(ctx.vllm_version, url),
            settings(args, phases, ctx),
            revision=revision,
            complete=complete,
            started_at=started_at,
            seconds=time.monotonic() - ctx.start,
        )
        bench_report.write_json(args.out, doc)
        return doc

    try:
        for phase in phases:
            ctx.say(f"==> {phase.name}: {phase.what}")
            results[phase.name] = run_phase(phase, ctx)
            if ctx.vllm_version is None and (phase.sandbox or ctx.url):
                ctx.vllm_version = server_version(ctx.url or "http://localhost:8000")
            write(complete=False)
            ctx.say(f"    {phase.name} took {results[phase.name]['seconds']:.0f} s")
    except KeyboardInterrupt:
        write(complete=False)
        print(f"\ninterrupted; the phases done so far are in {args.out}")
        return 130

    doc = write(complete=True)
    print()
    breakdown = (results.get("fresh_converge") or {}).get("details", {}).get("breakdown")
    if breakdown:
        print("fresh converge, per phase, against its floor (1 run):")
        print(bench_report.render_breakdown(breakdown))
        print()
    print(bench_report.render_table(results))
    m = doc["machine"]
    print(
        f"\nmachine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, kernel "
        f"{m['kernel']}, Docker {m['docker_server']}, vLLM {m['vllm_version']}; "
        f"load average {m['load_average']}"
    )
    print(f"medians over the runs shown (n); report: {args.out}; logs: {logs}/")
    once = [p.name for p in phases if ctx.runs_for(p.default_runs) == 1]
    if once and not ctx.quick:
        print(
            f"{', '.join(once)}: one run (each costs minutes; --runs N repeats them), so "
            "min = median = max there"
        )
    if ctx.quick:
        print("--quick: one run each and small model sizes; this checks the harness, not figures")
    if doc["failed"]:
        print(f"FAILED phases: {', '.join(doc['failed'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

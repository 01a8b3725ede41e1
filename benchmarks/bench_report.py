"""Figures (min/median/max of repeated runs), the terminal table and the JSON of `make bench`.

A figure is a plain dict so that it goes into the JSON as is::

    {"min": 41.2, "median": 43.0, "max": 47.9, "runs": [43.0, 41.2, 47.9], "n": 3, "unit": "s"}

Optional keys: ``aim`` (what the figure should stay under, e.g. ``"< 15 s"``), ``note``,
``derived`` (for a ratio: which two medians it divides).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = 1


def figure(
    samples: Iterable[float],
    unit: str,
    *,
    aim: str | None = None,
    note: str | None = None,
    digits: int = 4,
) -> dict[str, Any]:
    """min/median/max of ``samples`` (at least one), with the samples themselves."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("a figure needs at least one sample")
    out: dict[str, Any] = {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
        "n": len(values),
        "unit": unit,
    }
    if aim:
        out["aim"] = aim
    if note:
        out["note"] = note
    return out


def ratio(num: Mapping[str, Any], den: Mapping[str, Any], derived: str) -> dict[str, Any]:
    """``median(num) / median(den)``; min and max are the widest the samples allow."""
    if not den["median"] or not den["min"]:
        raise ValueError(f"cannot divide by a zero figure ({derived})")
    value = num["median"] / den["median"]
    return {
        "min": round(num["min"] / den["max"], 4),
        "median": round(value, 4),
        "max": round(num["max"] / den["min"], 4),
        "runs": [],
        "n": min(num["n"], den["n"]),
        "unit": "x",
        "derived": derived,
    }


def is_figure(value: Any) -> bool:
    return isinstance(value, Mapping) and {"min", "median", "max", "unit"} <= set(value)


# --- terminal table --------------------------------------------------------------------------


def fmt_value(value: float | None, unit: str = "") -> str:
    """A number with sensible precision for a table cell."""
    if value is None:
        return "-"
    if unit in ("count", "tasks"):
        return f"{value:.0f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1 or value == 0:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_table(phases: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per figure: phase, figure, median, min, max, n, unit, aim.

    ``phases`` maps a phase name to its report entry (``{"figures": {...}, "notes": [...],
    "error": ...}``); a failed phase shows its error instead of figures.
    """
    rows: list[tuple[str, ...]] = []
    for phase, entry in phases.items():
        figures = entry.get("figures") or {}
        first = True
        for name, fig in figures.items():
            if not is_figure(fig):
                continue
            unit = fig.get("unit", "")
            rows.append(
                (
                    phase if first else "",
                    name,
                    fmt_value(fig["median"], unit),
                    fmt_value(fig["min"], unit),
                    fmt_value(fig["max"], unit),
                    str(fig.get("n", "")),
                    unit,
                    fig.get("aim", ""),
                )
            )
            first = False
        if entry.get("error"):
            rows.append((phase if first else "", "FAILED: " + _one_line(entry["error"]), *[""] * 6))
    header = ("phase", "figure", "median", "min", "max", "n", "unit", "aim")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    widths[1] = min(widths[1], 60)
    right = {2, 3, 4, 5}

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    return "\n".join(lines)


def render_breakdown(breakdown: Sequence[Mapping[str, Any]]) -> str:
    """The fresh converge next to its floors: phase, converge s, floor s, ratio, floor method."""
    header = ("phase", "converge s", "floor s", "ratio", "floor (measured directly)")
    rows = []
    for row in breakdown:
        seconds, floor = row.get("seconds"), row.get("floor_s")
        ratio_cell = f"{seconds / floor:.1f}x" if seconds is not None and floor else "-"
        rows.append(
            (
                row["phase"],
                fmt_value(seconds),
                fmt_value(floor),
                ratio_cell,
                row.get("floor_method", ""),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        head = [cells[0].ljust(widths[0])] + [
            c.rjust(widths[i]) for i, c in enumerate(cells[1:4], 1)
        ]
        return ("  ".join(head) + "  " + cells[4]).rstrip()

    return "\n".join([line(header), *[line(r) for r in rows]])


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- machine and report ----------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _run(cmd: Sequence[str], timeout: float = 20) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def cpu_model(cpuinfo: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return None


def mem_total_bytes(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            return int(parts[1]) * 1024 if len(parts) >= 2 and parts[1].isdigit() else None
    return None


def os_name(os_release: str) -> str | None:
    for line in os_release.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def machine(vllm_version: str | None = None, vllm_url: str | None = None) -> dict[str, Any]:
    """What the figures were measured on."""
    mem = mem_total_bytes(_read("/proc/meminfo"))
    gpus = _run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    )
    try:
        from ansible.release import __version__ as ansible_version
    except ImportError:  # pragma: no cover - the venv always has it
        ansible_version = None
    return {
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 1) if mem else None,
        "cpu_model": cpu_model(_read("/proc/cpuinfo")) or platform.processor() or None,
        "kernel": platform.release(),
        "os": os_name(_read("/etc/os-release")),
        "python": platform.python_version(),
        "ansible_core": ansible_version,
        "docker_server": _run(["docker", "version", "--format", "{{.Server.Version}}"]),
        "vllm_version": vllm_version,
        "vllm_url": vllm_url,
        "gpus": gpus.splitlines() if gpus else [],
        # Other work on the machine skews every figure: 1, 5 and 15 minute load averages.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def git_revision(root: Path) -> dict[str, Any]:
    head = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return {"commit": head, "dirty": bool(dirty)}


def report(
    phases: Mapping[str, Mapping[str, Any]],
    machine_info: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    revision: Mapping[str, Any] | None = None,
    complete: bool = True,
    started_at: str | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """The JSON document of ``reports/bench.json``."""
    return {
        "schema": SCHEMA,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "started_at": started_at,
        "seconds": round(seconds, 1) if seconds is not None else None,
        "complete": complete,
        "revision": dict(revision or {}),
        "machine": dict(machine_info),
        "settings": dict(settings),
        "phases": {name: dict(entry) for name, entry in phases.items()},
        "failed": [name for name, entry in phases.items() if entry.get("error")],
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)

"""Reports of probe runs: a terminal table, JSON, and JUnit XML for CI."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import textwrap
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servekit.probe.result import ProbeResult, ProbeRun

_COLORS = {"PASS": "\033[32m", "FAIL": "\033[31m", "SKIP": "\033[33m"}
_BOLD = "\033[1m"
_RESET = "\033[0m"
_HEADER = ("check", "result", "time", "detail")
_FAIL_DETAIL_LINES = 4

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Characters XML 1.0 cannot carry, even escaped; server text may contain them.
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _use_color(color: bool | None) -> bool:
    if color is not None:
        return color
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _one_line(text: str) -> str:
    """Collapse whitespace and neutralise control characters (server text could carry
    terminal escape sequences)."""
    return _CONTROL.sub("\ufffd", " ".join(text.split()))


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _detail_lines(result: ProbeResult, width: int) -> list[str]:
    """One line for passes and skips; failures wrap over a few lines, as they matter most."""
    text = _one_line(result.detail) or "-"
    if not result.failed:
        return [_truncate(text, width)]
    lines = textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or ["-"]
    if len(lines) > _FAIL_DETAIL_LINES:
        rest = " ".join(lines[_FAIL_DETAIL_LINES - 1 :])
        lines = [*lines[: _FAIL_DETAIL_LINES - 1], _truncate(rest, width)]
    return lines


def _summary(run: ProbeRun) -> str:
    c = run.counts
    return f"{c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped"


def render_table(runs: list[ProbeRun], color: bool | None = None, width: int | None = None) -> str:
    """A plain-text table: one block per target, a summary line per target and overall.

    ``color`` None colours only when stdout is a terminal (and ``NO_COLOR`` is unset).
    ``width`` defaults to the terminal width (at least 80 columns).
    """
    colored = _use_color(color)
    width = width or max(shutil.get_terminal_size((120, 24)).columns, 80)

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if colored else text

    results = [r for run in runs for r in run.results]
    name_w = max([len(_HEADER[0])] + [len(r.name) for r in results])
    time_w = max([len(_HEADER[2])] + [len(_fmt_seconds(r.seconds)) for r in results])
    status_w = 6
    indent = "  "
    detail_w = max(width - len(indent) - name_w - status_w - time_w - 6, 30)
    pad = indent + " " * (name_w + status_w + time_w + 6)

    out: list[str] = []
    for run in runs:
        title = f"{run.target}  {run.base_url}" if run.target != run.base_url else run.target
        if run.model:
            title += f"  (model {run.model})"
        out.append(paint(title, _BOLD))
        out.append(
            f"{indent}{_HEADER[0]:<{name_w}}  {_HEADER[1]:<{status_w}}  "
            f"{_HEADER[2]:>{time_w}}  {_HEADER[3]}"
        )
        for r in run.results:
            status = paint(f"{r.status:<{status_w}}", _COLORS[r.status])
            lines = _detail_lines(r, detail_w)
            out.append(
                f"{indent}{r.name:<{name_w}}  {status}  {_fmt_seconds(r.seconds):>{time_w}}  "
                f"{lines[0]}"
            )
            out.extend(pad + line for line in lines[1:])
        verdict = "PASS" if run.ok else "FAIL"
        out.append(
            f"{indent}{run.target}: {paint(verdict, _COLORS[verdict])}  {_summary(run)} "
            f"in {_fmt_seconds(run.seconds)}"
        )
        out.append("")

    ok_runs = sum(1 for run in runs if run.ok)
    overall = "PASS" if runs and ok_runs == len(runs) else "FAIL"
    totals = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for run in runs:
        for key, n in run.counts.items():
            totals[key] += n
    out.append(
        f"overall: {paint(overall, _BOLD + _COLORS[overall])}  {ok_runs} of {len(runs)} targets ok "
        f"({totals['PASS']} passed, {totals['FAIL']} failed, {totals['SKIP']} skipped)"
    )
    return "\n".join(out) + "\n"


def _result_dict(r: ProbeResult) -> dict[str, Any]:
    return {
        "name": r.name,
        "status": r.status,
        "ok": r.ok,
        "skipped": r.skipped,
        "seconds": r.seconds,
        "detail": r.detail,
    }


def to_json(runs: list[ProbeRun], generated_at: str | None = None) -> dict[str, Any]:
    """The JSON report as a dict."""
    return {
        "generated_at": generated_at or datetime.now(UTC).isoformat(timespec="seconds"),
        "ok": bool(runs) and all(run.ok for run in runs),
        "targets": [
            {
                "target": run.target,
                "base_url": run.base_url,
                "model": run.model,
                "started_at": run.started_at,
                "seconds": run.seconds,
                "ok": run.ok,
                "counts": run.counts,
                "results": [_result_dict(r) for r in run.results],
            }
            for run in runs
        ],
    }


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("\ufffd", text)


def to_junit(runs: list[ProbeRun], generated_at: str | None = None) -> ET.ElementTree:
    """JUnit XML: one <testsuite> per target, one <testcase> per probe."""
    stamp = generated_at or datetime.now(UTC).isoformat(timespec="seconds")
    root = ET.Element("testsuites", name="probes")
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    total_time = 0.0
    for run in runs:
        counts = run.counts
        suite_time = sum(r.seconds for r in run.results)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=_xml_text(run.target),
            tests=str(len(run.results)),
            failures=str(counts["FAIL"]),
            errors="0",
            skipped=str(counts["SKIP"]),
            time=f"{suite_time:.3f}",
            timestamp=run.started_at or stamp,
        )
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="base_url", value=_xml_text(run.base_url))
        if run.model:
            ET.SubElement(props, "property", name="model", value=_xml_text(run.model))
        for r in run.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=_xml_text(f"probes.{run.target}"),
                name=_xml_text(r.name),
                time=f"{r.seconds:.3f}",
            )
            detail = _xml_text(r.detail)
            if r.skipped:
                ET.SubElement(case, "skipped", message=detail)
            elif not r.ok:
                failure = ET.SubElement(case, "failure", message=detail, type="ProbeFailure")
                failure.text = detail
            else:
                ET.SubElement(case, "system-out").text = detail
        totals["tests"] += len(run.results)
        totals["failures"] += counts["FAIL"]
        totals["skipped"] += counts["SKIP"]
        total_time += suite_time
    root.set("tests", str(totals["tests"]))
    root.set("failures", str(totals["failures"]))
    root.set("errors", "0")
    root.set("skipped", str(totals["skipped"]))
    root.set("time", f"{total_time:.3f}")
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_reports(runs: list[ProbeRun], outdir: Path, basename: str = "probes") -> dict[str, Path]:
    """Write ``<outdir>/<basename>.json`` and ``<outdir>/<basename>.junit.xml``.

    Returns ``{"json": path, "junit": path}``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    json_path = outdir / f"{basename}.json"
    junit_path = outdir / f"{basename}.junit.xml"
    json_path.write_text(
        json.dumps(to_json(runs, stamp), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    to_junit(runs, stamp).write(junit_path, encoding="utf-8", xml_declaration=True)
    return {"json": json_path, "junit": junit_path}

"""What `make verify` found, per host: the host checks' results (read from pytest's JUnit files,
merged into ``hosts.junit.xml``), in the probes' result types for the table, and ``verify.json``
(host checks and request probes side by side, with an overall ``ok``)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servekit.probe import ProbeResult, ProbeRun
from servekit.probe.report import to_json

_OUTPUT_TAIL = 4000


@dataclass
class HostTest:
    """One host check of one host, as pytest reported it."""

    name: str  # "test_host.py::test_docker_is_active_and_enabled"
    status: str  # PASS, FAIL or SKIP (a pytest error counts as FAIL)
    seconds: float
    detail: str = ""  # the failure or skip message


@dataclass
class HostChecks:
    """The host checks of one host."""

    host: str
    rc: int  # pytest's exit code
    tests: list[HostTest] = field(default_factory=list)
    seconds: float = 0.0
    output: str = ""  # what pytest printed

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.tests) and not any(t.status == "FAIL" for t in self.tests)

    @property
    def counts(self) -> dict[str, int]:
        counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        for t in self.tests:
            counts[t.status] += 1
        return counts


@dataclass
class VerifyResult:
    host_checks_rc: int
    runs: list[ProbeRun] = field(default_factory=list)
    hosts: list[HostChecks] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.host_checks_rc == 0
            and bool(self.runs)
            and all(r.ok for r in self.runs)
            and all(h.ok for h in self.hosts)
        )


# --------------------------------------------------------------------------- JUnit


def _test_name(case: ET.Element, host: str | None = None) -> str:
    """``test_host.py::test_x`` from a pytest testcase, without testinfra's host id.

    testinfra puts the host first in the test id (``test_x[ansible://h]``); any further
    parameters (``test_x[ansible://h-a]``) are kept when ``host`` says where the id ends.
    """
    module = (case.get("classname") or "").rsplit(".", 1)[-1]
    name = case.get("name") or "?"
    base, bracket, param = name.partition("[")
    param = param.removesuffix("]")
    rest = param
    if bracket and host is not None and param.startswith(f"ansible://{host}"):
        rest = param[len(f"ansible://{host}") :].removeprefix("-")
    elif "://" in param or param == "local":
        rest = ""
    full = f"{base}[{rest}]" if rest else base
    return f"{module}.py::{full}" if module else full


_RANK = {"PASS": 0, "SKIP": 1, "FAIL": 2}


REPORT_PREFIX = "report: "


def parse_junit(source: Path | str, host: str | None = None) -> list[HostTest]:
    """Host test results from a pytest JUnit XML file (or its text), in file order.

    A test reported twice (a failure in the call and an error in teardown) keeps its worst
    status.
    """
    text = Path(source).read_text(encoding="utf-8") if isinstance(source, Path) else source
    root = ET.fromstring(text)
    results: dict[str, HostTest] = {}
    for case in root.iter("testcase"):
        status, detail = "PASS", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "FAIL"
                message = child.get("message") or (child.text or "").strip()
                detail = _clean_message(message)
                if child.tag == "error":
                    detail = f"error {detail}" if detail.startswith("in ") else f"error: {detail}"
                    if message == "collection failure":  # says nothing: add the exception
                        raised = [
                            ln[1:].strip()
                            for ln in (child.text or "").splitlines()
                            if ln.startswith("E ")
                        ]
                        named = [ln for ln in raised if re.match(r"\w+(Error|Exception)\b", ln)]
                        if named or raised:
                            detail += f" ({(named or raised)[0]})"
                break
            if child.tag == "skipped":
                status, detail = "SKIP", _clean_message(child.get("message") or "")
            if child.tag == "system-out" and not detail:
                # A passing check may report what it saw: its printed "report: ..." lines.
                reported = [
                    ln.removeprefix(REPORT_PREFIX).strip()
                    for ln in (child.text or "").splitlines()
                    if ln.startswith(REPORT_PREFIX)
                ]
                detail = "; ".join(reported)
        name = _test_name(case, host)
        test = HostTest(name, status, float(case.get("time") or 0.0), detail)
        seen = results.get(name)
        if seen is None:
            results[name] = test
        elif _RANK[status] > _RANK[seen.status]:
            test.seconds += seen.seconds
            results[name] = test
    return list(results.values())


def _clean_message(message: str) -> str:
    """The assertion's own message: no "AssertionError: " prefix, no pytest rewrite tail;
    a fixture error says where ("in setup: ...")."""
    where = ""
    for phase in ("setup", "teardown"):  # pytest's wrapper for errors in fixtures
        wrapper = f'failed on {phase} with "'
        if message.startswith(wrapper):
            where, message = f"in {phase}: ", message[len(wrapper) :].removesuffix('"')
    for prefix in ("AssertionError: ", "Failed: ", "Skipped: "):
        message = message.removeprefix(prefix)
    cut = message.find("\nassert ")
    return where + (message[:cut] if cut >= 0 else message).strip()


def merge_junit(parts: Sequence[tuple[str, Path | None, HostChecks]], out: Path) -> None:
    """Write one JUnit file with one ``<testsuite name=HOST>`` per host.

    A host whose pytest wrote no report gets a suite with one errored testcase that carries
    the end of pytest's output.
    """
    root = ET.Element("testsuites", name="host checks")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for host, path, checks in parts:
        suites = []
        if path is not None and path.exists():
            tree = ET.parse(path)
            got = tree.getroot()
            suites = [got] if got.tag == "testsuite" else list(got.iter("testsuite"))
        if not suites:
            suite = ET.Element(
                "testsuite", name=host, tests="1", failures="0", errors="1", skipped="0"
            )
            suite.set("time", f"{checks.seconds:.3f}")
            case = ET.SubElement(suite, "testcase", classname="host_checks", name="pytest")
            err = ET.SubElement(
                case, "error", message=f"pytest exited {checks.rc} without a report"
            )
            err.text = checks.output[-_OUTPUT_TAIL:]
            suites = [suite]
        for suite in suites:
            suite.set("name", host)
            props = suite.find("properties")
            if props is None:
                props = ET.Element("properties")
                suite.insert(0, props)
            ET.SubElement(props, "property", name="host", value=host)
            for key in totals:
                totals[key] += int(suite.get(key) or 0)
            total_time += float(suite.get("time") or 0.0)
            root.append(suite)
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("time", f"{total_time:.3f}")
    tree = ET.ElementTree(root)
    ET.indent(tree)
    out.parent.mkdir(parents=True, exist_ok=True)
    tree.write(out, encoding="utf-8", xml_declaration=True)


# --------------------------------------------------------------------------- results


def host_checks_rc(results: Sequence[HostChecks]) -> int:
    if not results:
        return 5  # pytest's "no tests collected"
    return next((c.rc or 1 for c in results if not c.ok), 0)


def host_checks_as_runs(results: Sequence[HostChecks]) -> list[ProbeRun]:
    """Host checks in the probes' result types, for the same table."""
    runs = []
    for checks in results:
        run = ProbeRun(
            target=checks.host, base_url="host checks", seconds=checks.seconds, model=None
        )
        for t in checks.tests:
            run.results.append(
                ProbeResult(
                    t.name.split("::", 1)[-1],
                    t.status != "FAIL",
                    t.detail,
                    t.seconds,
                    skipped=t.status == "SKIP",
                )
            )
        if not checks.tests:
            tail = " ".join(checks.output.strip().splitlines()[-3:])
            run.results.append(
                ProbeResult("pytest", False, f"exit {checks.rc} without results: {tail}", 0.0)
            )
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- report


def to_verify_json(
    result: VerifyResult,
    inventory: Path | str | None = None,
    group: str | None = None,
    generated_at: str | None = None,
) -> dict[str, Any]:
    """The combined report: per host, its host checks and its probe run."""
    stamp = generated_at or datetime.now(UTC).isoformat(timespec="seconds")
    probes = {t["target"]: t for t in to_json(result.runs, stamp)["targets"]}
    checks = {c.host: c for c in result.hosts}
    names = list(checks) + [n for n in probes if n not in checks]
    hosts: dict[str, Any] = {}
    for name in names:
        c = checks.get(name)
        p = probes.get(name)
        host_checks = (
            {
                "ok": c.ok,
                "rc": c.rc,
                "seconds": c.seconds,
                "counts": c.counts,
                "tests": [
                    {"name": t.name, "status": t.status, "seconds": t.seconds, "detail": t.detail}
                    for t in c.tests
                ],
            }
            if c is not None
            else None
        )
        probe_part = (
            {
                k: p[k]
                for k in ("ok", "base_url", "model", "started_at", "seconds", "counts", "results")
            }
            if p is not None
            else None
        )
        hosts[name] = {
            "ok": bool(host_checks and host_checks["ok"] and probe_part and probe_part["ok"]),
            "host_checks": host_checks,
            "probes": probe_part,
        }
    return {
        "generated_at": stamp,
        "inventory": str(inventory) if inventory is not None else None,
        "group": group,
        "ok": result.ok,
        "hosts_ok": sum(1 for h in hosts.values() if h["ok"]),
        "hosts_total": len(hosts),
        "hosts": hosts,
    }


def write_verify_json(
    result: VerifyResult, report_dir: Path, inventory: Path | str, group: str
) -> Path:
    path = Path(report_dir) / "verify.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(to_verify_json(result, inventory, group), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    return path

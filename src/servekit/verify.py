"""`make verify`: host checks (pytest-testinfra) and request probes over one inventory.

Every host of the group is checked in parallel, one pytest process per host (so one slow or
unreachable host holds up no other); then every endpoint is probed in parallel. Hosts of the
gateway group get their own host checks (``tests/infra/gateway``: HAProxy, its configuration,
every backend up) and the request probes through the gateway, without ``/metrics`` (refused
there unless ``gateway_expose_metrics``). Reports go to the report directory:

- ``hosts.junit.xml``: the host checks, one ``<testsuite>`` per host;
- ``probes.json``, ``probes.junit.xml``: the request probes;
- ``verify.json``: both, per host, with an overall ``ok``.

The run passes only when every host check passed (skips are fine) and every probe run is ok.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servekit.inventory import API_KEY_ENV, ProbeTarget, gateway_targets, group_hosts
from servekit.inventory import probe_targets as inventory_targets
from servekit.probe import ProbeResult, ProbeRun, probe_targets
from servekit.probe.report import render_table, to_json, write_reports

ROOT = Path(__file__).resolve().parents[2]
HOST_CHECKS = ROOT / "tests" / "infra"
GATEWAY_CHECKS = HOST_CHECKS / "gateway"
GATEWAY_GROUP = "gateway"
HOST_JOBS = 16  # pytest processes at once
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


# --------------------------------------------------------------------------- host checks


def _pytest_env() -> dict[str, str]:
    env = dict(os.environ)
    # testinfra calls ansible-inventory, and reads SSH settings from the Ansible config.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.setdefault("ANSIBLE_CONFIG", str(ROOT / "ansible" / "ansible.cfg"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _test_files(tests: Path) -> list[str]:
    """The host-check modules, general ones (test_host.py) before the GPU ones."""
    if not tests.is_dir():
        return [str(tests)]
    files = sorted(tests.glob("test_*.py"), key=lambda p: (p.name != "test_host.py", p.name))
    return [str(p) for p in files] or [str(tests)]


def _pytest_command(host: str, inventory: Path, junit: Path, tests: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        *_test_files(tests),
        f"--hosts=ansible://{host}",
        f"--ansible-inventory={inventory}",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "--tb=short",
        "--color=no",
        "-o",
        "junit_family=xunit2",
        "-o",
        "junit_logging=system-out",
        f"--junitxml={junit}",
    ]


def check_hosts(
    hosts: Sequence[str],
    inventory: Path,
    report_dir: Path,
    jobs: int = HOST_JOBS,
    tests: Path = HOST_CHECKS,
    cwd: Path = ROOT,
    tests_for: Mapping[str, Path] | None = None,
) -> list[HostChecks]:
    """Run the host checks on every host, ``jobs`` hosts at a time; write hosts.junit.xml.

    ``tests_for`` gives some hosts other checks than ``tests`` (the gateway hosts).
    Returns one :class:`HostChecks` per host, in the order given.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    inventory = Path(inventory).resolve()
    env = _pytest_env()
    with tempfile.TemporaryDirectory(prefix="servekit-hosts-") as tmp:

        def one(indexed: tuple[int, str]) -> tuple[HostChecks, Path]:
            i, host = indexed
            junit = Path(tmp) / f"host-{i}.junit.xml"
            start = time.perf_counter()
            proc = subprocess.run(
                _pytest_command(host, inventory, junit, (tests_for or {}).get(host, tests)),
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            checks = HostChecks(
                host, proc.returncode, seconds=round(time.perf_counter() - start, 3)
            )
            checks.output = proc.stdout
            if junit.exists():
                checks.tests = parse_junit(junit, host)
            c = checks.counts
            print(
                f"    {host}: {'ok' if checks.ok else 'FAILED'} ({c['PASS']} passed, "
                f"{c['FAIL']} failed, {c['SKIP']} skipped; pytest exit {checks.rc}) "
                f"in {checks.seconds:.1f}s",
                flush=True,
            )
            return checks, junit

        if not hosts:
            done: list[tuple[HostChecks, Path]] = []
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(hosts)))) as pool:
                done = list(pool.map(one, enumerate(hosts)))
        merge_junit([(c.host, junit, c) for c, junit in done], report_dir / "hosts.junit.xml")
    return [c for c, _ in done]


def run_host_checks(
    inventory: Path, report_dir: Path, group: str = "gpu_hosts", jobs: int = HOST_JOBS
) -> int:
    """Run the host checks over the group; return 0 when all passed (else the first non-zero
    pytest exit code, or 5 when the group has no hosts)."""
    results = check_hosts(group_hosts(inventory, group), inventory, report_dir, jobs)
    return host_checks_rc(results)


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


# --------------------------------------------------------------------------- probes


def probe_all(targets: Sequence[ProbeTarget], timeout: float = 60.0) -> list[ProbeRun]:
    """Probe every target in parallel; runs come back in the targets' order.

    Targets that share model, key and expectations go through one parallel
    :func:`probe_targets` call; differing groups run side by side in threads.
    """
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(targets):
        key = (t.model, t.api_key, t.max_model_len, t.reasoning_parser, t.checks)
        groups.setdefault(key, []).append(i)

    def one(key: tuple) -> list[ProbeRun]:
        model, api_key, max_model_len, parser, checks = key
        return probe_targets(
            [(targets[i].host, targets[i].url) for i in groups[key]],
            model=model,
            api_key=api_key,
            max_model_len=max_model_len,
            timeout=timeout,
            reasoning_parser=parser,
            checks=checks,
        )

    runs: list[ProbeRun | None] = [None] * len(targets)
    if not groups:
        return []
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        for key, group_runs in zip(groups, pool.map(one, groups), strict=True):
            for i, run in zip(groups[key], group_runs, strict=True):
                runs[i] = run
    return [r for r in runs if r is not None]


def run_request_probes(
    inventory: Path,
    report_dir: Path,
    group: str = "gpu_hosts",
    timeout: float = 60.0,
    gateway_group: str | None = GATEWAY_GROUP,
) -> list[ProbeRun]:
    targets = inventory_targets(inventory, group)
    if gateway_group:
        targets += gateway_targets(inventory, gateway_group, group)
    _warn_unresolved_keys(targets)
    runs = probe_all(targets, timeout)
    print(render_table(runs))
    write_reports(runs, report_dir)
    return runs


def _warn_unresolved_keys(targets: Sequence[ProbeTarget]) -> None:
    hosts = [t.host for t in targets if t.api_key_source == "unresolved"]
    if hosts:
        print(
            f"    note: vllm_service_api_key of {', '.join(hosts)} is a template or vault value; "
            f"set {API_KEY_ENV} to give the probes the key",
            flush=True,
        )


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


# --------------------------------------------------------------------------- verify


def run_verify(
    inventory: Path,
    report_dir: Path,
    group: str = "gpu_hosts",
    jobs: int = HOST_JOBS,
    timeout: float = 60.0,
    gateway_group: str | None = GATEWAY_GROUP,
) -> VerifyResult:
    hosts = group_hosts(inventory, group)
    gateways = (
        [g for g in group_hosts(inventory, gateway_group) if g not in hosts]
        if gateway_group
        else []
    )
    also = f" and {len(gateways)} of {gateway_group}" if gateways else ""
    print(
        f"==> host checks on {len(hosts)} host(s) of {group}{also} in {inventory} "
        f"({min(jobs, len(hosts) + len(gateways)) or 1} at a time)",
        flush=True,
    )
    checks = check_hosts(
        hosts + gateways,
        inventory,
        report_dir,
        jobs,
        tests_for=dict.fromkeys(gateways, GATEWAY_CHECKS),
    )
    for c in checks:
        if not c.ok:
            print(f"--- host checks of {c.host} (pytest output)\n{c.output.rstrip()}\n", flush=True)
    print(render_table(host_checks_as_runs(checks)), flush=True)

    print(f"==> request probes on {group}{also} of {inventory}", flush=True)
    runs = run_request_probes(inventory, report_dir, group, timeout, gateway_group)
    result = VerifyResult(host_checks_rc(checks), runs, checks)
    report = write_verify_json(result, report_dir, inventory, group)
    verdict = "PASSED" if result.ok else "FAILED"
    print(
        f"==> verify {verdict}: host checks {'ok' if result.host_checks_rc == 0 else 'failed'}, "
        f"request probes {'ok' if runs and all(r.ok for r in runs) else 'failed'}; "
        f"reports in {report_dir}/ ({report.name}, hosts.junit.xml, probes.json, "
        "probes.junit.xml)"
    )
    return result

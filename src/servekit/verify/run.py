"""`make verify`: host checks (pytest-testinfra) and request probes over one inventory.

Every host of the group is checked in parallel, one pytest process per host (so one slow or
unreachable host holds up no other); then every endpoint is probed in parallel. Hosts of the
gateway group get their own host checks (``host_checks/gateway``: HAProxy, its configuration,
every backend up) and the request probes through the gateway, without ``/metrics`` (refused
there unless ``gateway_expose_metrics``). Reports go to the report directory:

- ``hosts.junit.xml``: the host checks, one ``<testsuite>`` per host;
- ``probes.json``, ``probes.junit.xml``: the request probes;
- ``verify.json``: both, per host, with an overall ``ok``.

The run passes only when every host check passed (skips are fine) and every probe run is ok.
The inventory is read once (``ansible-inventory --list``) and handed to every question asked of
it. The host checks are the pytest modules in ``host_checks/``, shipped with this package;
``deep`` has them hash the model files against the manifest's SHA-256 instead of comparing
sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from servekit.checkout import repo_root
from servekit.inventory import API_KEY_ENV, Inventory, ProbeTarget, gateway_targets
from servekit.inventory import probe_targets as inventory_targets
from servekit.probe import ProbeRun, probe_targets
from servekit.probe.report import render_table, write_reports

from .report import (
    HostChecks,
    VerifyResult,
    host_checks_as_runs,
    host_checks_rc,
    merge_junit,
    parse_junit,
    write_verify_json,
)

#: The host checks (pytest-testinfra modules), shipped with the package.
HOST_CHECKS = Path(__file__).resolve().parent / "host_checks"
GATEWAY_CHECKS = HOST_CHECKS / "gateway"
GATEWAY_GROUP = "gateway"
HOST_JOBS = 16  # pytest processes at once


# --------------------------------------------------------------------------- host checks


def _pytest_env() -> dict[str, str]:
    # testinfra shares one SSH connection per host (ansible.cfg's control_path) only where
    # Ansible's control_path_dir already exists; without it every command is a new handshake.
    Path("~/.ansible/cp").expanduser().mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(os.environ)
    # testinfra calls ansible-inventory, and reads SSH settings from the Ansible config.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.setdefault("ANSIBLE_CONFIG", str(repo_root() / "ansible" / "ansible.cfg"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _test_files(tests: Path) -> list[str]:
    """The host-check modules, general ones (test_host.py) before the GPU ones."""
    if not tests.is_dir():
        return [str(tests)]
    files = sorted(tests.glob("test_*.py"), key=lambda p: (p.name != "test_host.py", p.name))
    return [str(p) for p in files] or [str(tests)]


def _pytest_command(
    host: str, inventory: Path, junit: Path, tests: Path, deep: bool = False
) -> list[str]:
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
        *(["--deep"] if deep else []),
    ]


def check_hosts(
    hosts: Sequence[str],
    inventory: Path,
    report_dir: Path,
    jobs: int = HOST_JOBS,
    tests: Path = HOST_CHECKS,
    cwd: Path | None = None,
    tests_for: Mapping[str, Path] | None = None,
    deep: bool = False,
) -> list[HostChecks]:
    """Run the host checks on every host, ``jobs`` hosts at a time; write hosts.junit.xml.

    ``tests_for`` gives some hosts other checks than ``tests`` (the gateway hosts); ``cwd``
    (the checkout by default) is where relative paths of the inventory start; ``deep`` is
    passed on to the checks as ``--deep``. Returns one :class:`HostChecks` per host, in the
    order given.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    inventory = Path(inventory).resolve()
    env = _pytest_env()
    cwd = cwd or repo_root()
    with tempfile.TemporaryDirectory(prefix="servekit-hosts-") as tmp:

        def one(indexed: tuple[int, str]) -> tuple[HostChecks, Path]:
            i, host = indexed
            junit = Path(tmp) / f"host-{i}.junit.xml"
            start = time.perf_counter()
            proc = subprocess.run(
                _pytest_command(host, inventory, junit, (tests_for or {}).get(host, tests), deep),
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
    inventory: Inventory | Path,
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


# --------------------------------------------------------------------------- verify


def run_verify(
    inventory: Path,
    report_dir: Path,
    group: str = "gpu_hosts",
    jobs: int = HOST_JOBS,
    timeout: float = 60.0,
    gateway_group: str | None = GATEWAY_GROUP,
    deep: bool = False,
) -> VerifyResult:
    """Host checks, then request probes, of every host of ``group`` and ``gateway_group``;
    the reports go to ``report_dir``. ``deep`` hashes the model files on every host."""
    read = Inventory.read(inventory)
    hosts = read.hosts(group)
    gateways = [g for g in read.hosts(gateway_group) if g not in hosts] if gateway_group else []
    also = f" and {len(gateways)} of {gateway_group}" if gateways else ""
    print(
        f"==> host checks{' (deep)' if deep else ''} on {len(hosts)} host(s) of {group}{also} "
        f"in {inventory} "
        f"({min(jobs, len(hosts) + len(gateways)) or 1} at a time)",
        flush=True,
    )
    checks = check_hosts(
        hosts + gateways,
        inventory,
        report_dir,
        jobs,
        tests_for=dict.fromkeys(gateways, GATEWAY_CHECKS),
        deep=deep,
    )
    for c in checks:
        if not c.ok:
            print(f"--- host checks of {c.host} (pytest output)\n{c.output.rstrip()}\n", flush=True)
    print(render_table(host_checks_as_runs(checks)), flush=True)

    print(f"==> request probes on {group}{also} of {inventory}", flush=True)
    runs = run_request_probes(read, report_dir, group, timeout, gateway_group)
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

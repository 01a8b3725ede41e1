"""`make verify`: host checks (pytest-testinfra) and request probes over one inventory."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from servekit.inventory import probe_targets as inventory_targets
from servekit.probe import ProbeRun, probe_targets
from servekit.probe.report import render_table, write_reports

ROOT = Path(__file__).resolve().parents[2]
HOST_CHECKS = ROOT / "tests" / "infra"


@dataclass
class VerifyResult:
    host_checks_rc: int
    runs: list[ProbeRun] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.host_checks_rc == 0 and bool(self.runs) and all(r.ok for r in self.runs)


def run_host_checks(inventory: Path, report_dir: Path, group: str = "gpu_hosts") -> int:
    """Runs the testinfra suite over every host of the group; returns pytest's exit code."""
    report_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HOST_CHECKS),
        f"--hosts=ansible://{group}",
        f"--ansible-inventory={inventory}",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rf",
        f"--junitxml={report_dir / 'hosts.junit.xml'}",
    ]
    # testinfra runs ansible-inventory/ansible from PATH: use the ones beside this Python.
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible" / "ansible.cfg"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def run_request_probes(
    inventory: Path, report_dir: Path, group: str = "gpu_hosts", timeout: float = 60.0
) -> list[ProbeRun]:
    runs: list[ProbeRun] = []
    for t in inventory_targets(inventory, group):
        runs.extend(
            probe_targets(
                [(t.host, t.url)],
                model=t.model,
                api_key=t.api_key,
                max_model_len=t.max_model_len,
                timeout=timeout,
                reasoning_parser=t.reasoning_parser,
            )
        )
    print(render_table(runs))
    write_reports(runs, report_dir)
    return runs


def run_verify(inventory: Path, report_dir: Path, group: str = "gpu_hosts") -> VerifyResult:
    print(f"==> host checks on {group} of {inventory}", flush=True)
    rc = run_host_checks(inventory, report_dir, group)
    print(f"==> request probes on {group} of {inventory}", flush=True)
    runs = run_request_probes(inventory, report_dir, group)
    result = VerifyResult(rc, runs)
    verdict = "PASSED" if result.ok else "FAILED"
    print(
        f"==> verify {verdict}: host checks {'ok' if rc == 0 else 'failed'}, "
        f"request probes {'ok' if runs and all(r.ok for r in runs) else 'failed'}; "
        f"reports in {report_dir}/"
    )
    return result

"""One sandbox deployment shared by the end-to-end modules (deploy, faults), made once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from sandbox_helpers import ROOT, ansible_playbook

from servekit.sandbox import manager

FAULTS: list[dict] = []
# A first sandbox build (images, ~10 min on two cores) plus the first converge.
PREPARED_BUDGET_S = 40 * 60


@pytest.fixture(scope="session")
def deployment():
    """The sandbox, up and converged once: here, or by `scripts/prepare-sandbox` in the
    background (`make test` starts it before lint; SERVEKIT_PREPARED_DEPLOY names its exit
    status file, and its output is reports/deploy-1.log)."""
    prepared = os.environ.get("SERVEKIT_PREPARED_DEPLOY")
    if prepared:
        status = Path(prepared)
        deadline = time.monotonic() + PREPARED_BUDGET_S
        while not status.exists():
            assert time.monotonic() < deadline, f"no {status} after {PREPARED_BUDGET_S} s"
            time.sleep(2)
        output = (ROOT / "reports" / "deploy-1.log").read_text()
        assert status.read_text().strip() == "0", f"the background deploy failed:\n{output[-5000:]}"
        manager.up()  # already up: checks it and returns at once
    else:
        manager.up()
        output = ansible_playbook("deploy-1")
    yield output
    manager.down()


@pytest.fixture(scope="session")
def fault_table():
    """Rows of the fault table: fault, detected after, healthy again after, data lost."""
    return FAULTS


def pytest_terminal_summary(terminalreporter):
    if not FAULTS:
        return
    report = ROOT / "reports" / "faults.json"
    report.parent.mkdir(exist_ok=True)
    report.write_text(json.dumps(FAULTS, indent=2))
    tr = terminalreporter
    tr.section("fault table")
    tr.write_line(f"{'fault':<44} {'detected after':>15} {'healthy again after':>20}  data lost")
    for row in FAULTS:
        detected = "-" if row["detected_s"] is None else f"{row['detected_s']:.1f} s"
        healthy = "-" if row["healthy_s"] is None else f"{row['healthy_s']:.1f} s"
        tr.write_line(f"{row['fault']:<44} {detected:>15} {healthy:>20}  {row['data_lost']}")
    tr.write_line(f"(also in {report})")


# Modules that change the sandbox for good run after the single-host ones, in this order: the
# fleet takes the single host over as its first host, and the lifecycle module ends with
# `down(purge=True)`.
LAST = {"test_fleet_live.py": 1, "test_sandbox_host.py": 2}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LAST.get(item.path.name, 0))

"""Phase timings for `make test`: with SERVEKIT_PHASES set to a file, each run appends one
line per phase (the unit tests as one, each end-to-end module on its own) with its wall time
and outcome; `scripts/phase-table` prints them. A shared fixture (the sandbox deployment)
counts in the module that first needs it."""

from __future__ import annotations

import os
import time
from pathlib import Path

PHASES = os.environ.get("SERVEKIT_PHASES")
_phases: dict[str, dict] = {}


def _phase(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "unit" if path.startswith("tests/unit/") else Path(path).stem


def pytest_runtest_logstart(nodeid, location):
    phase = _phases.setdefault(_phase(nodeid), {"start": time.monotonic(), "failed": False})
    phase["end"] = time.monotonic()


def pytest_runtest_logreport(report):
    phase = _phases.setdefault(_phase(report.nodeid), {"start": time.monotonic(), "failed": False})
    phase["end"] = time.monotonic()
    phase["failed"] |= report.failed


def pytest_sessionfinish(session, exitstatus):
    if not PHASES or not _phases:
        return
    with open(PHASES, "a") as fh:
        for name, phase in _phases.items():
            seconds = phase["end"] - phase["start"]
            fh.write(f"{name}\t{seconds:.0f}\t{'failed' if phase['failed'] else 'passed'}\n")

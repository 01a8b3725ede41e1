"""The host checks `make verify` runs on each host import and collect: a broken import there
shows up only on a live host otherwise, as one collection error instead of the checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOST_CHECKS = Path(__file__).resolve().parents[2] / "src" / "servekit" / "verify" / "host_checks"


def test_every_host_check_module_collects():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HOST_CHECKS),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=HOST_CHECKS,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    modules = {
        line.split("::", 1)[0].rsplit("/", 1)[-1]
        for line in result.stdout.splitlines()
        if "::" in line
    }
    expected = {p.name for p in HOST_CHECKS.rglob("test_*.py")}
    assert modules == expected, (modules, expected)

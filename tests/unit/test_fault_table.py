"""scripts/fault-table writes README's fault rows from a run's reports/faults.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault-table"

ROWS = [
    {
        "fault": "container killed (SIGKILL)",
        "detected_s": 0.4,
        "healthy_s": 36.1,
        "data_lost": "none",
    },
    {"fault": "load: 256 chats", "detected_s": None, "healthy_s": None, "data_lost": "0 failed"},
]


def run(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=False
    )


def test_the_rows_replace_what_was_between_the_markers(tmp_path):
    faults, readme = tmp_path / "faults.json", tmp_path / "README.md"
    faults.write_text(json.dumps(ROWS))
    readme.write_text(
        "intro\n<!-- fault-table:begin -->\nold | rows\n<!-- fault-table:end -->\nafter\n"
    )
    assert run(faults, readme).returncode == 0
    text = readme.read_text()
    assert "old | rows" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| container killed (SIGKILL) | 0.4 s | 36.1 s | none |" in text
    assert "| load: 256 chats | - | - | 0 failed |" in text
    once = text
    assert run(faults, readme).returncode == 0
    assert readme.read_text() == once


def test_a_readme_without_markers_is_an_error(tmp_path):
    faults, readme = tmp_path / "faults.json", tmp_path / "README.md"
    faults.write_text(json.dumps(ROWS))
    readme.write_text("no table here\n")
    result = run(faults, readme)
    assert result.returncode == 1 and "fault-table:begin" in result.stderr
    assert readme.read_text() == "no table here\n"


def test_the_project_readme_has_the_markers():
    text = (SCRIPT.parents[1] / "README.md").read_text()
    assert (
        text.count("<!-- fault-table:begin -->") == 1
        and text.count("<!-- fault-table:end -->") == 1
    )

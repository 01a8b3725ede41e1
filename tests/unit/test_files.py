"""Skipping files that are already current: the servekit_file_state module reads real files,
and the servekit_file_current filter judges its result (ansible/library, plugins/filter)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "ansible" / "library" / "servekit_file_state.py"
sys.path.insert(0, str(ROOT / "ansible" / "plugins" / "filter"))

from servekit_files import file_current  # noqa: E402 (path set above)


def read_state(*paths: Path) -> dict:
    args = json.dumps({"ANSIBLE_MODULE_ARGS": {"paths": [str(p) for p in paths]}})
    done = subprocess.run(
        [sys.executable, str(MODULE)], input=args, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@pytest.fixture
def unit(tmp_path):
    path = tmp_path / "vllm.service"
    path.write_text("[Unit]\nDescription=vLLM\n")
    path.chmod(0o644)
    return path


def me():
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def test_a_file_with_the_same_content_mode_and_owner_is_current(unit):
    state = read_state(unit)
    assert state["changed"] is False
    assert file_current(state, str(unit), "[Unit]\nDescription=vLLM\n", "0644", *me())


@pytest.mark.parametrize(
    "content, mode, owner",
    [
        ("[Unit]\nDescription=vLLM\n\n", "0644", None),  # one more newline
        ("[Unit]\nDescription=vLLM\n", "0600", None),
        ("[Unit]\nDescription=vLLM\n", "0644", "servekit-nobody"),
    ],
    ids=["content", "mode", "owner"],
)
def test_any_difference_sends_the_file_through_its_task(unit, content, mode, owner):
    user, group = me()
    assert not file_current(read_state(unit), str(unit), content, mode, owner or user, group)


def test_missing_files_and_directories_are_not_current_and_raise_nothing(unit, tmp_path):
    missing = tmp_path / "nope" / "vllm.env"
    state = read_state(unit, missing, tmp_path)
    assert [f["path"] for f in state["files"]] == [str(unit), str(tmp_path)]
    assert not file_current(state, str(missing), "", "0600", *me())
    assert not file_current(state, str(tmp_path), "", "0755", *me())


def test_no_state_read_means_every_task_runs():
    # A task file run on its own (tags) has no registered state: the template runs as before.
    assert not file_current({}, "/etc/vllm/vllm.env", "", "0600")
    assert not file_current(None, "/etc/vllm/vllm.env", "", "0600")

"""Skipping files and directories that are already current: the servekit_file_state module
reads real paths, and the servekit_*_current filters judge its result (ansible/library,
plugins/filter)."""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from servekit_files import dir_current, file_current, present  # ansible/plugins/filter

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "ansible" / "library" / "servekit_file_state.py"


def read_state(*paths: Path, contents: tuple[Path, ...] = ()) -> dict:
    params = {"paths": [str(p) for p in paths], "contents": [str(p) for p in contents]}
    args = json.dumps({"ANSIBLE_MODULE_ARGS": params})
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


def test_a_directory_with_the_same_mode_and_owner_is_current(tmp_path):
    conf = tmp_path / "vllm"
    conf.mkdir(mode=0o700)
    conf.chmod(0o700)
    state = read_state(conf)
    assert dir_current(state, str(conf), "0700", *me())
    assert not dir_current(state, str(conf), "0755", *me())
    assert not dir_current(state, str(conf), "0700", "servekit-nobody", me()[1])


def test_a_file_where_a_directory_belongs_or_a_missing_one_is_not_current(unit, tmp_path):
    state = read_state(unit, tmp_path / "absent")
    assert not dir_current(state, str(unit), "0644", *me())
    assert not dir_current(state, str(tmp_path / "absent"), "0755", *me())
    assert not dir_current({}, "/etc/vllm", "0700")


def test_present_reports_any_path_that_exists(unit, tmp_path):
    state = read_state(unit, tmp_path, tmp_path / "absent")
    assert present(state, str(unit)) and present(state, str(tmp_path))
    assert not present(state, str(tmp_path / "absent"))
    assert not present(None, str(unit))


def test_content_is_returned_only_for_the_paths_asked(unit, tmp_path):
    other = tmp_path / "daemon.json"
    other.write_text('{"log-driver": "journald"}\n')
    by_path = {f["path"]: f for f in read_state(unit, other, contents=(other,))["files"]}
    assert base64.b64decode(by_path[str(other)]["content"]) == b'{"log-driver": "journald"}\n'
    assert "content" not in by_path[str(unit)]


# --- docker_engine: daemon.json merged from the state read, skipped when current ---------


def _daemon_json_task(found: dict) -> tuple[str, bool]:
    """What docker_engine would write to daemon.json for ``found``, and whether it skips."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    role = ROOT / "ansible" / "roles" / "docker_engine"
    loader = DataLoader()
    tasks = loader.load_from_file(str(role / "tasks" / "configure.yml"), trusted_as_template=True)
    task = next(t for t in tasks if t["name"].startswith("Docker engine | Render daemon.json"))
    variables = {}
    for path in (role / "defaults" / "main.yml", role / "vars" / "main.yml"):
        variables.update(loader.load_from_file(str(path), trusted_as_template=True))
    variables.update(task["vars"], __docker_engine_daemon_json=found)
    templar = Templar(loader=loader, variables=variables)
    templar.environment.filters["servekit_file_current"] = file_current
    content = templar.template(task["ansible.builtin.copy"]["content"])
    skip = templar.template(trust_as_template("{{ " + task["when"] + " }}"))
    return content, not skip


def _daemon_json_state(tmp_path: Path, text: str | None) -> dict:
    path = Path("/etc/docker/daemon.json")
    local = tmp_path / "daemon.json"
    if text is not None:
        local.write_text(text)
        local.chmod(0o644)
    state = read_state(local, contents=(local,))
    for entry in state["files"]:
        entry.update(path=str(path), pw_name="root", gr_name="root")
    return state


def test_daemon_json_keeps_keys_of_other_tools_and_is_skipped_once_written(tmp_path):
    content, skipped = _daemon_json_task(
        _daemon_json_state(tmp_path, '{"data-root": "/srv/docker"}\n')
    )
    assert not skipped
    merged = json.loads(content)
    assert merged["data-root"] == "/srv/docker"
    assert set(merged) > {"data-root"}
    again, skipped = _daemon_json_task(_daemon_json_state(tmp_path, content))
    assert again == content and skipped


def test_daemon_json_is_written_when_missing(tmp_path):
    content, skipped = _daemon_json_task(_daemon_json_state(tmp_path, None))
    assert not skipped and json.loads(content)

"""The model role installs the ModelScope SDK from a hashed lock (pip --require-hashes).

The lock (ansible/roles/model/files/modelscope-sdk.lock.txt) must pin every requirement to one
version with the SHA-256 of its wheels, be complete for each host Python, agree with the tested
control-node set, and the role's "already installed" check must read it the way pip does.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import packaging
import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from servekit_packages import pip_requirements  # ansible/plugins/filter, on pytest's pythonpath

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "ansible" / "roles" / "model"
LOCK = MODEL / "files" / "modelscope-sdk.lock.txt"


#: The hosts' Pythons: Ubuntu 22.04, Debian 12, Ubuntu 24.04.
HOST_PYTHONS = ["3.10", "3.11", "3.12"]


def entries() -> list[tuple[Requirement, list[str]]]:
    """Each requirement of the lock with its hashes, read line by line as pip reads the file."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    found = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = re.split(r"\s+(?=--)", line)
        assert all(o.startswith("--hash=") for o in options), f"only hashes may follow: {line}"
        found.append((Requirement(requirement), [o.removeprefix("--hash=") for o in options]))
    return found


def applicable(python: str) -> dict[str, Requirement]:
    """The lock's requirements whose environment marker holds on ``python`` (one per name)."""
    environment = default_environment() | {
        "python_version": python,
        "python_full_version": python + ".0",
    }
    chosen: dict[str, Requirement] = {}
    for requirement, _ in entries():
        if requirement.marker is None or requirement.marker.evaluate(environment):
            name = canonicalize_name(requirement.name)
            assert name not in chosen, f"{name} twice for Python {python}"
            chosen[name] = requirement
    return chosen


def test_every_requirement_is_pinned_and_hashed():
    found = entries()
    assert len(found) >= 14
    for requirement, hashes in found:
        (spec,) = requirement.specifier  # one clause
        assert spec.operator == "==" and "*" not in spec.version, requirement
        assert not requirement.extras, requirement
        assert hashes, f"{requirement} has no hash"
        for digest in hashes:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), (requirement, digest)
        assert len(set(hashes)) == len(hashes), f"{requirement} lists a hash twice"


@pytest.mark.parametrize("python", HOST_PYTHONS)
def test_each_host_python_gets_one_version_of_each_package(python):
    chosen = applicable(python)
    assert str(chosen["modelscope"].specifier) == "==1.40.2"
    assert str(chosen["modelscope-hub"].specifier) == "==0.5.1"
    # cryptography needs typing-extensions below Python 3.11, and only there.
    assert ("typing-extensions" in chosen) == (python == "3.10")


def test_the_lock_has_what_the_sdk_needs_on_the_sandbox_python():
    """Complete for Python 3.11 (Debian 12, the sandbox): every dependency of every locked
    package, as its metadata declares it, is locked too. The metadata is read from this
    environment (the control node's, Python 3.11), which holds the same versions."""
    assert sys.version_info[:2] == (3, 11), "the control-node environment runs Python 3.11"
    chosen = applicable("3.11")
    checked = []
    for name, requirement in chosen.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version not in requirement.specifier:
            continue  # another version here (setuptools): its metadata says nothing of the lock's
        checked.append(name)
        for needed in map(Requirement, dist.requires or []):
            if needed.marker is None or needed.marker.evaluate({"extra": ""}):
                locked = chosen.get(canonicalize_name(needed.name))
                assert locked is not None, f"{name} needs {needed}, which the lock lacks"
                assert next(iter(locked.specifier)).version in needed.specifier, (name, needed)
    assert {"modelscope", "modelscope-hub", "requests", "cryptography", "cffi"} <= set(checked)


def test_the_lock_agrees_with_the_tested_control_node_set():
    pinned = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version.strip()
    for name, requirement in applicable("3.11").items():
        if name in pinned:
            assert str(requirement.specifier) == "==" + pinned[name], name


def test_the_role_reads_the_same_requirements_as_pip():
    assert pip_requirements(LOCK.read_text()) == [str(r).replace(";", " ;") for r, _ in entries()]
    text = (
        "# a comment\na==1 \\\n    --hash=sha256:00 # why\n"
        "b==2;python_version<'3.11' --hash=sha256:11\n--require-hashes\n-r other.txt\n"
    )
    assert pip_requirements(text) == ["a==1", "b==2 ; python_version<'3.11'"]


def test_the_role_installs_from_the_lock_with_hashes_required():
    tasks = yaml.safe_load((MODEL / "tasks" / "install.yml").read_text())
    pip = next(t["ansible.builtin.pip"] for t in tasks if "ansible.builtin.pip" in t)
    assert pip["requirements"] == "{{ _model_sdk_lock_path }}"
    assert pip["extra_args"].split() == ["--require-hashes", "--only-binary=:all:"]
    assert "name" not in pip
    defaults = yaml.safe_load((MODEL / "defaults" / "main.yml").read_text())
    assert (MODEL / "files" / defaults["model_sdk_lock"]) == LOCK


# --- the role's "already installed" check -----------------------------------------------


def _check(site: Path, pins: list[str]) -> int:
    """Runs the role's check script as the role does (the pins as JSON), in a Python that sees
    only ``site`` (fake installed packages) and the packaging module the script imports."""
    script = yaml.safe_load((MODEL / "vars" / "main.yml").read_text())["_model_pins_installed"]
    code = site.parent / f"{site.name}-code"
    shutil.copytree(Path(packaging.__file__).parent, code / "packaging")
    env = {"PYTHONPATH": f"{site}:{code}", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-S", "-c", script, json.dumps(pins)]
    return subprocess.run(cmd, env=env, capture_output=True, check=False).returncode


def _install(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.fixture
def pins() -> list[str]:
    return pip_requirements(LOCK.read_text())


def test_check_passes_when_every_pin_for_this_python_is_installed(tmp_path, pins):
    for requirement in applicable("3.11").values():
        _install(tmp_path, requirement.name, next(iter(requirement.specifier)).version)
    # filelock 4.1.0 (Python < 3.11 only) is not installed: its marker rules it out here.
    assert _check(tmp_path, pins) == 0


def test_check_fails_on_another_version_or_a_missing_package(tmp_path, pins):
    versions = {
        r.name: next(iter(r.specifier)).version
        for r in applicable("3.11").values()
        if r.name != "tqdm"
    }
    for name, version in versions.items():
        _install(tmp_path, name, "2.0" if name == "requests" else version)
    assert _check(tmp_path, pins) == 1  # requests 2.0 instead of the lock's
    other = tmp_path / "other"
    for name, version in versions.items():
        _install(other, name, version)
    assert _check(other, pins) == 1  # tqdm missing

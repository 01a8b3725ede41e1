"""The model role's module against servekit's mirror, with the real modelscope SDK."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from ansible_local import local_ansible_env
from test_mirror import _start, _stop

from servekit.testmodel import generate

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "ansible" / "library" / "servekit_model_sync.py"
MODEL_ID = "Qwen/Qwen3-8B"
LOCK = ".servekit.lock"
MODULE_TIMEOUT = 300


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    generate(root / MODEL_ID)
    (root / MODEL_ID / "extra").mkdir()
    (root / MODEL_ID / "extra" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    server = _start(root, tmp_path_factory.mktemp("log") / "mirror.log")
    yield root, server.url
    _stop(server)


def start_sync(tmp_path: Path, endpoint: str, models: Path, **params) -> subprocess.Popen:
    """Start one run of the module, as Ansible would; ``finish`` waits for its result."""
    args = {"model_id": MODEL_ID, "endpoint": endpoint, "root": str(models), **params}
    args_file = tmp_path / f"args-{len(list(tmp_path.glob('args-*')))}.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(
        os.environ,
        MODELSCOPE_CACHE=str(tmp_path / "cache"),
        MODELSCOPE_HOME=str(tmp_path / "home"),
        MODELSCOPE_API_TOKEN="",
        NO_PROXY="127.0.0.1,localhost",
    )
    return subprocess.Popen(
        [sys.executable, str(MODULE), str(args_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen) -> tuple[int, dict]:
    stdout, stderr = proc.communicate(timeout=MODULE_TIMEOUT)
    try:
        return proc.returncode, json.loads(stdout)
    except ValueError:
        raise AssertionError(f"no JSON result (exit code {proc.returncode}):\n{stderr}") from None


def sync(tmp_path: Path, endpoint: str, models: Path, **params) -> tuple[int, dict]:
    return finish(start_sync(tmp_path, endpoint, models, **params))


def test_download_verify_publish_then_rerun_is_unchanged(mirror, tmp_path):
    source, url = mirror
    models = tmp_path / "models"
    rc, first = sync(tmp_path, url, models)
    assert rc == 0, first
    assert first["changed"] is True
    current = models / MODEL_ID / "current"
    assert current.is_symlink() and os.readlink(current) == "master"
    for rel in ["config.json", "model.safetensors", "tokenizer.json", "extra/blob.bin"]:
        assert sha256(current / rel) == sha256(source / MODEL_ID / rel), rel
    manifest = json.loads((current / ".servekit-manifest.json").read_text())
    assert "extra/blob.bin" in manifest["files"]
    assert not (models / MODEL_ID / ".staging" / "master").exists()

    rc, second = sync(tmp_path, url, models)
    assert rc == 0 and second["changed"] is False, second


def test_quick_trusts_the_manifest_and_deep_rehashes_and_refetches(mirror, tmp_path):
    source, url = mirror
    models = tmp_path / "models"
    assert sync(tmp_path, url, models)[0] == 0
    blob = models / MODEL_ID / "master" / "extra" / "blob.bin"
    st = blob.stat()
    # Same size, same mtime, different bytes: only a full re-hash can tell.
    data = bytearray(blob.read_bytes())
    data[12345] ^= 0xFF
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))

    rc, quick = sync(tmp_path, url, models)
    assert rc == 0 and quick["changed"] is False, "quick mode must not read file contents"

    rc, deep = sync(tmp_path, url, models, verify="deep")
    assert rc == 0 and deep["changed"] is True, deep
    assert deep["refetch"] == ["extra/blob.bin"]
    assert deep.get("replaced") is True
    fixed = models / MODEL_ID / "current" / "extra" / "blob.bin"
    assert sha256(fixed) == sha256(source / MODEL_ID / "extra" / "blob.bin")


def test_touched_file_is_rehashed_once_and_kept(mirror, tmp_path):
    _, url = mirror
    models = tmp_path / "models"
    assert sync(tmp_path, url, models)[0] == 0
    config = models / MODEL_ID / "master" / "config.json"
    os.utime(config, None)
    rc, out = sync(tmp_path, url, models)
    assert rc == 0 and out["changed"] is True and "refetch" not in out, out
    rc, again = sync(tmp_path, url, models)
    assert rc == 0 and again["changed"] is False


def test_too_little_disk_fails_before_any_download(mirror, tmp_path):
    _, url = mirror
    models = tmp_path / "models"
    rc, out = sync(tmp_path, url, models, space_margin=1e9)
    assert rc != 0
    assert "not enough disk" in out["msg"]
    assert out["required_bytes"] > out["available_bytes"]
    staging = models / MODEL_ID / ".staging" / "master"
    assert not any(p.is_file() for p in staging.rglob("*")), "nothing may be downloaded"
    assert not (models / MODEL_ID / "current").exists()


def test_unknown_model_fails_clearly(mirror, tmp_path):
    _, url = mirror
    rc, out = sync(tmp_path, url, tmp_path / "models", model_id="nobody/nothing")
    assert rc != 0
    assert "cannot list model nobody/nothing" in out["msg"]


# --- the store: versions kept, one run at a time, leftovers collected ------------------------


def versions(models: Path) -> list[str]:
    """The published version directories of the model."""
    model_dir = models / MODEL_ID
    return sorted(
        p.name
        for p in model_dir.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )


def current(models: Path) -> str:
    return os.readlink(models / MODEL_ID / "current")


def served(url: str) -> dict[str, dict[str, int]]:
    """What the mirror has sent since it started, per file of the model."""
    resp = requests.get(url + "/servekit/stats", timeout=10)
    assert resp.status_code == 200, resp.text
    prefix = f"{MODEL_ID}/"
    return {k.removeprefix(prefix): v for k, v in resp.json()["files"].items()}


def sent_since(url: str, before: dict[str, dict[str, int]]) -> dict[str, int]:
    """Requests per file since the ``served`` snapshot ``before``."""
    counts = {
        p: c["requests"] - before.get(p, {}).get("requests", 0) for p, c in served(url).items()
    }
    return {p: n for p, n in counts.items() if n}


def unshared_bytes(directory: Path) -> int:
    return sum(
        p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.stat().st_nlink == 1
    )


def waiting_for(lock: Path) -> set[int]:
    """Processes blocked in flock() on ``lock``, as the kernel lists them in /proc/locks."""
    inode = str(lock.stat().st_ino)
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: -> FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        if len(fields) > 6 and fields[1:3] == ["->", "FLOCK"] and fields[6].endswith(":" + inode):
            pids.add(int(fields[5]))
    return pids


def test_roll_back_then_update_keeps_the_version_rolled_back_to(mirror, tmp_path):
    source, url = mirror
    models = tmp_path / "models"
    for revision in ("X", "Y"):
        rc, out = sync(tmp_path, url, models, revision=revision)
        assert rc == 0 and out["changed"] is True, out

    before = served(url)
    rc, back = sync(tmp_path, url, models, revision="X")
    assert rc == 0 and back["changed"] is True, back
    assert current(models) == "X" and back["pruned"] == []
    assert sent_since(url, before) == {}, "a roll-back to a version on disk downloads nothing"

    rc, out = sync(tmp_path, url, models, revision="Z")  # keep_versions: 2
    assert rc == 0, out
    assert current(models) == "Z"
    assert out["pruned"] == ["Y"] and versions(models) == ["X", "Z"]
    assert out["protected"] == ["X", "Z"]
    blob = "extra/blob.bin"
    assert sha256(models / MODEL_ID / "X" / blob) == sha256(source / MODEL_ID / blob)
    rc, again = sync(tmp_path, url, models, revision="X")
    assert rc == 0 and "refetch" not in again and "reverify" not in again, again


def test_a_protected_version_survives_pruning(mirror, tmp_path):
    _, url = mirror
    models = tmp_path / "models"
    for revision in ("a", "b"):
        assert sync(tmp_path, url, models, revision=revision, keep_versions=1)[0] == 0
    # By a path inside the version, as a unit mounting it names it.
    inside_a = str(models / MODEL_ID / "a" / "config.json")
    rc, out = sync(tmp_path, url, models, revision="c", keep_versions=1, protect=[inside_a])
    assert rc == 0, out
    assert out["pruned"] == [] and versions(models) == ["a", "b", "c"]
    assert out["protected"] == ["a", "b", "c"] and out["keep_versions_exceeded"] is True
    assert "more than keep_versions=1" in json.dumps(out["warnings"]), out

    # Once c is current, only the protected a is kept beside it; unprotected, a goes too.
    rc, out = sync(tmp_path, url, models, revision="c", keep_versions=1, protect=["a"])
    assert rc == 0 and out["changed"] is True and out["pruned"] == ["b"], out
    assert versions(models) == ["a", "c"]
    rc, out = sync(tmp_path, url, models, revision="c", keep_versions=1)
    assert rc == 0 and out["pruned"] == ["a"] and versions(models) == ["c"], out
    assert "keep_versions_exceeded" not in out


def test_two_runs_at_once_take_turns_and_the_second_finds_the_work_done(mirror, tmp_path):
    source, url = mirror
    models = tmp_path / "models"
    lock = models / MODEL_ID / LOCK
    lock.parent.mkdir(parents=True)
    before = served(url)
    with lock.open("a") as held:
        # Holding the lock makes both runs queue on it: neither can start before the other.
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = [start_sync(tmp_path, url, models) for _ in range(2)]
        deadline = time.monotonic() + MODULE_TIMEOUT  # only against a hang
        while waiting_for(lock) != {run.pid for run in runs}:
            assert all(run.poll() is None for run in runs), [finish(r) for r in runs]
            assert time.monotonic() < deadline, Path("/proc/locks").read_text()
            time.sleep(0.01)
    results = [finish(run) for run in runs]

    for rc, out in results:
        assert rc == 0 and out["waited_for_lock"] is True, out
    assert sorted(out["changed"] for _, out in results) == [False, True], results
    # One download in all: every file crossed the wire once.
    model_files = (source / MODEL_ID).rglob("*")
    files = {p.relative_to(source / MODEL_ID).as_posix() for p in model_files if p.is_file()}
    assert sent_since(url, before) == dict.fromkeys(files, 1)
    published = models / MODEL_ID / "current"
    for rel in ["config.json", "model.safetensors", "tokenizer.json", "extra/blob.bin"]:
        assert sha256(published / rel) == sha256(source / MODEL_ID / rel), rel
    assert not (models / MODEL_ID / ".staging").exists()
    assert versions(models) == ["master"]


def test_a_run_that_cannot_get_the_lock_in_time_names_it(mirror, tmp_path):
    _, url = mirror
    models = tmp_path / "models"
    lock = models / MODEL_ID / LOCK
    lock.parent.mkdir(parents=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, out = sync(tmp_path, url, models, lock_timeout=1)
    assert rc != 0, out
    assert str(lock) in out["msg"] and "model_lock_timeout" in out["msg"], out["msg"]
    assert versions(models) == [] and not (models / MODEL_ID / "current").exists()


def test_five_updates_keep_the_store_bounded_and_collect_leftovers(mirror, tmp_path):
    _, url = mirror
    models = tmp_path / "models"
    model_dir = models / MODEL_ID
    bounded = {"keep_versions": 2, "protect": ["v1"]}
    for i in range(1, 5):
        rc, out = sync(tmp_path, url, models, revision=f"v{i}", **bounded)
        assert rc == 0, out
        assert len(versions(models)) <= 2 + 1, (i, versions(models))
    assert versions(models) == ["v1", "v3", "v4"]

    # What interrupted runs leave: a part-downloaded other revision, a version set aside while
    # it was being replaced (one file shares its inode with the served version: not freed).
    partial = model_dir / ".staging" / "v9" / "weights.bin.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(os.urandom(1024 * 1024 + 3))
    aside = model_dir / ".replaced-v4-1700000000"
    (aside / "extra").mkdir(parents=True)
    (aside / "extra" / "old.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    os.link(model_dir / "v4" / "config.json", aside / "config.json")
    leftover_bytes = partial.stat().st_size + (aside / "extra" / "old.bin").stat().st_size
    v3_bytes = unshared_bytes(model_dir / "v3")

    rc, out = sync(tmp_path, url, models, revision="v5", **bounded)
    assert rc == 0, out
    assert out["collected"] == [".staging/v9", ".replaced-v4-1700000000"]
    assert out["pruned"] == ["v3"]
    assert out["freed_bytes"] == leftover_bytes + v3_bytes
    assert versions(models) == ["v1", "v4", "v5"]  # keep_versions plus the protected v1
    assert not (model_dir / ".staging").exists() and not aside.exists()
    assert sha256(model_dir / "v4" / "config.json") == sha256(model_dir / "v5" / "config.json")

    # Once v5 has served a run, v4 is no longer the previous version: the protected v1 counts
    # towards keep_versions, so v4 goes.
    rc, again = sync(tmp_path, url, models, revision="v5", **bounded)
    assert rc == 0 and again["pruned"] == ["v4"] and again["collected"] == [], again
    assert versions(models) == ["v1", "v5"]
    rc, again = sync(tmp_path, url, models, revision="v5", **bounded)
    assert rc == 0 and again["changed"] is False and again["freed_bytes"] == 0, again


def test_a_branch_revision_records_the_commit_it_resolved_to(mirror, tmp_path):
    _, url = mirror
    revisions = requests.get(f"{url}/api/v1/models/{MODEL_ID}/revisions", timeout=10).json()
    (branch,) = revisions["Data"]["RevisionMap"]["Branches"]
    assert branch["Revision"] == "master"
    models = tmp_path / "models"
    rc, out = sync(tmp_path, url, models)
    assert rc == 0 and out["commit_id"] == branch["CommitId"], out
    manifest = json.loads((models / MODEL_ID / "master" / ".servekit-manifest.json").read_text())
    assert manifest["commit_id"] == branch["CommitId"]

    # A tag (or a commit) is not a branch the hub resolves: nothing is recorded.
    rc, out = sync(tmp_path, url, models, revision="v1.0")
    assert rc == 0 and "commit_id" not in out, out
    manifest = json.loads((models / MODEL_ID / "v1.0" / ".servekit-manifest.json").read_text())
    assert "commit_id" not in manifest


ROLE_PLAY = """
- name: The model role's download step on this machine
  hosts: gpu_hosts
  gather_facts: false
  environment: "{{ sdk_env }}"
  tasks:
    - name: Download, verify and publish
      ansible.builtin.include_role: {name: model, tasks_from: configure}
    - name: Keep the module's result for the test
      ansible.builtin.copy:
        content: "{{ __model_sync | to_json }}"
        dest: "{{ result_file }}"
        mode: "0644"
"""


def test_the_role_keeps_the_version_the_server_mounts(mirror, tmp_path):
    _, url = mirror
    models = tmp_path / "models"
    for revision in ("W", "X", "Y"):
        assert sync(tmp_path, url, models, revision=revision, keep_versions=3)[0] == 0
    # The server still runs W (its unit, as the vllm_service role writes it); `current` is Y.
    unit = tmp_path / "vllm.service"
    mounted = models / MODEL_ID / "W"
    unit.write_text(
        "ExecStart=/usr/bin/docker run --rm --name vllm \\\n"
        f"  --volume {mounted}:/models/Qwen3-8B:ro \\\n"
        "  --volume /opt/servekit/python:/opt/servekit/python:ro \\\n"
    )
    template = ROOT / "ansible" / "roles" / "vllm_service" / "templates" / "vllm.service.j2"
    assert "--volume {{ vllm_service_model_path }}:" in template.read_text()

    result_file = tmp_path / "result.json"
    extra = {
        "servekit_model_root": str(models),
        "servekit_model_endpoint": url,
        "servekit_model_revision": "Z",
        "servekit_model_keep_versions": 3,
        "model_venv": sys.prefix,
        "_model_server_unit": str(unit),
        "result_file": str(result_file),
        "sdk_env": {
            "MODELSCOPE_CACHE": str(tmp_path / "cache"),
            "MODELSCOPE_HOME": str(tmp_path / "home"),
            "MODELSCOPE_API_TOKEN": "",
            "NO_PROXY": "127.0.0.1,localhost",
        },
    }
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    (tmp_path / "play.yml").write_text(ROLE_PLAY)
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"children": {"gpu_hosts": {"hosts": {"gpu-1": local}}}}}
    (tmp_path / "hosts.yml").write_text(json.dumps(inventory))
    playbook = Path(sys.executable).with_name("ansible-playbook")
    cmd = [str(playbook), "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "play.yml")]
    proc = subprocess.run(
        [*cmd, "-e", f"@{tmp_path / 'extra.json'}"],
        cwd=ROOT,
        env=local_ansible_env(tmp_path, ANSIBLE_ROLES_PATH=str(ROOT / "ansible" / "roles")),
        capture_output=True,
        text=True,
        timeout=MODULE_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    out = json.loads(result_file.read_text())
    # W (mounted), Y (current before) and Z (new) fill servekit_model_keep_versions: X goes.
    # (With the role's default of 2 the three would exceed it, and the result would say so.)
    assert out["pruned"] == ["X"] and out["protected"] == ["W", "Y", "Z"], out
    assert "keep_versions_exceeded" not in out
    assert versions(models) == ["W", "Y", "Z"] and current(models) == "Z"


def test_the_role_reads_the_unit_the_vllm_service_role_writes():
    model_vars = yaml.safe_load(
        (ROOT / "ansible" / "roles" / "model" / "vars" / "main.yml").read_text()
    )
    tasks = (ROOT / "ansible" / "roles" / "vllm_service" / "tasks" / "configure.yml").read_text()
    assert "/etc/systemd/system/{{ item }}" in tasks and "vllm.service" in tasks
    assert model_vars["_model_server_unit"] == "/etc/systemd/system/vllm.service"

"""The model role's module against servekit's mirror, with the real modelscope SDK."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_mirror import _start, _stop

from servekit.testmodel import generate

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "ansible" / "library" / "servekit_model_sync.py"
MODEL_ID = "Qwen/Qwen3-8B"


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


def sync(tmp_path: Path, endpoint: str, models: Path, **params) -> tuple[int, dict]:
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
    proc = subprocess.run(
        [sys.executable, str(MODULE), str(args_file)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


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

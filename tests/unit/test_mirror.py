"""The ModelScope-compatible mirror, over real HTTP, with the unmodified ModelScope SDK and CLI."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servekit.mirror import FetchError, fetch
from servekit.mirror.fetch import split_model_id, staging_dir
from servekit.mirror.process import MirrorProcess, start_mirror
from servekit.mirror.server import Mirror
from servekit.mirror.store import STATE_DIR, ModelStore
from servekit.testmodel import generate

MODEL = "test/tiny"
BIG = "sub/deep/blob.bin"
BIG_SIZE = 3 * 1024 * 1024 + 17  # not a multiple of any buffer size
START_TIMEOUT = 20.0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(model_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of the files a client should see.

    Hidden names and files still being downloaded (``*.incomplete``) are left out.
    """
    out = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        hidden = any(p.startswith(".") for p in rel.parts)
        if path.is_file() and not hidden and path.suffix != ".incomplete":
            out[rel.as_posix()] = _sha256(path)
    return out


def _fill(root: Path) -> Path:
    model_dir = generate(root / "test" / "tiny")
    big = model_dir / BIG
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(BIG_SIZE))
    # Neither listed nor served: hidden names, and a download still in progress.
    (model_dir / ".hidden").write_text("secret")
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "config").write_text("secret")
    (model_dir / "part.bin.incomplete").write_bytes(b"partial")
    # A plain file with a ".gz" sibling: each is served as itself.
    (model_dir / "notes.txt").write_text("plain notes\n")
    (model_dir / "notes.txt.gz").write_bytes(b"\x1f\x8bnot really gzip")
    return model_dir


class Server(MirrorProcess):
    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kwargs)


def _start(root: Path, log: Path) -> Server:
    """Run ``python -m servekit.mirror ROOT --port 0`` and wait until /healthz answers 200."""
    started = start_mirror(root, log, timeout=START_TIMEOUT, ready_timeout=START_TIMEOUT)
    server = Server(url=started.url, root=started.root, proc=started.proc, log=started.log)
    assert server.root == root.resolve()
    return server


def _stop(server: Server) -> int:
    return server.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mirror-a")
    _fill(root)
    return root


@pytest.fixture(scope="module")
def model_dir(root: Path) -> Path:
    return root / "test" / "tiny"


@pytest.fixture(scope="module")
def server(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _start(root, tmp_path_factory.mktemp("logs") / "mirror-a.log")
    yield server
    assert _stop(server) == 0, server.log.read_text()


@pytest.fixture
def sdk_env(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A hermetic environment for the ModelScope SDK, pointed at the mirror."""
    env = {
        "MODELSCOPE_ENDPOINT": server.url,
        "MODELSCOPE_CACHE": str(tmp_path / "ms-cache"),
        "MODELSCOPE_HOME": str(tmp_path / "ms-home"),
        "MODELSCOPE_API_TOKEN": "",
        "MODELSCOPE_DOWNLOAD_INTRA_CLOUD": "false",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


def _listing(server: Server, model: str = MODEL, **params: str) -> requests.Response:
    params = {"Revision": "master", "Recursive": "True", **params}
    return server.get(f"/api/v1/models/{model}/repo/files", params=params)


def _file_url(model: str = MODEL) -> str:
    return f"/api/v1/models/{model}/repo"


# --- listing -------------------------------------------------------------------------------


def test_listing_matches_disk(server: Server, model_dir: Path) -> None:
    resp = _listing(server)
    assert resp.status_code == 200
    body = resp.json()
    assert body["Code"] == 200 and body["Success"] is True and body["RequestId"]
    files = body["Data"]["Files"]
    expected = _tree(model_dir)
    assert {f["Path"]: f["Sha256"] for f in files} == expected
    assert ".hidden" not in expected and "part.bin.incomplete" not in expected
    assert BIG in expected and "notes.txt.gz" in expected
    for f in files:
        assert f["Size"] == (model_dir / f["Path"]).stat().st_size
        assert f["Name"] == f["Path"].rsplit("/", 1)[-1]
        assert f["Type"] == "blob"
        assert f["Revision"] == "master"
    lfs = {f["Path"] for f in files if f["IsLFS"]}
    assert "model.safetensors" in lfs and "config.json" not in lfs


def test_listing_echoes_revision(server: Server) -> None:
    files = _listing(server, Revision="v1.2.3").json()["Data"]["Files"]
    assert {f["Revision"] for f in files} == {"v1.2.3"}


def test_listing_non_recursive_and_root(server: Server) -> None:
    top = _listing(server, Recursive="False").json()["Data"]["Files"]
    assert {f["Path"]: f["Type"] for f in top if f["Type"] == "tree"} == {"sub": "tree"}
    assert all("/" not in f["Path"] for f in top)
    deep = _listing(server, Root="sub").json()["Data"]["Files"]
    assert [(f["Path"], f["Size"]) for f in deep] == [(BIG, BIG_SIZE)]
    assert _listing(server, Root="nope").status_code == 404
    assert _listing(server, Root="../test").status_code == 400


def test_unknown_model_404(server: Server) -> None:
    for model in ("test/nope", "nobody/tiny"):
        resp = _listing(server, model=model)
        assert resp.status_code == 404
        body = resp.json()
        assert body["Code"] == 404 and body["Success"] is False
        assert body["Message"] == f"model {model} not found"
        assert server.get(f"/api/v1/models/{model}/revisions").status_code == 404
        resp = server.get(_file_url(model), params={"FilePath": "config.json"})
        assert resp.status_code == 404


def test_revisions(server: Server) -> None:
    first = server.get(f"/api/v1/models/{MODEL}/revisions").json()
    second = server.get(f"/api/v1/models/{MODEL}/revisions").json()
    assert first["Code"] == 200
    branches = first["Data"]["RevisionMap"]["Branches"]
    assert [b["Revision"] for b in branches] == ["master"]
    assert re.fullmatch(r"[0-9a-f]{40}", branches[0]["CommitId"])
    assert first["Data"]["RevisionMap"]["Tags"] == []
    assert first["Data"] == second["Data"]


def test_model_info_and_health(server: Server) -> None:
    info = server.get(f"/api/v1/models/{MODEL}").json()
    assert info["Data"]["ModelId"] == MODEL
    health = server.get("/healthz")
    assert (health.status_code, health.text.strip()) == (200, "ok")
    assert server.get("/api/v1/repos/internalAccelerationInfo").status_code == 404


def test_hash_cache_outside_models(server: Server, root: Path, model_dir: Path) -> None:
    assert (root / STATE_DIR / "sha256-cache.json").is_file()
    assert not [p for p in model_dir.rglob("*servekit*")]


# --- files ---------------------------------------------------------------------------------


def test_download_whole_file(server: Server, model_dir: Path) -> None:
    resp = server.get(_file_url(), params={"Revision": "master", "FilePath": BIG})
    assert resp.status_code == 200
    assert int(resp.headers["Content-Length"]) == BIG_SIZE
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.content == (model_dir / BIG).read_bytes()


def test_range_request(server: Server, model_dir: Path) -> None:
    data = (model_dir / BIG).read_bytes()
    url = _file_url()
    resp = server.get(url, params={"FilePath": BIG}, headers={"Range": "bytes=1000-1999"})
    assert resp.status_code == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-1999/{BIG_SIZE}"
    assert resp.content == data[1000:2000]
    # How the SDK resumes: an open-ended range from the bytes it already has.
    start = BIG_SIZE - 12345
    resp = server.get(url, params={"FilePath": BIG}, headers={"Range": f"bytes={start}-"})
    assert resp.status_code == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{BIG_SIZE - 1}/{BIG_SIZE}"
    assert int(resp.headers["Content-Length"]) == 12345
    assert resp.content == data[start:]


def test_range_beyond_end_416(server: Server) -> None:
    resp = server.get(
        _file_url(), params={"FilePath": BIG}, headers={"Range": f"bytes={BIG_SIZE}-"}
    )
    assert resp.status_code == 416
    assert resp.headers["Content-Range"] == f"bytes */{BIG_SIZE}"


def test_unknown_file_404(server: Server) -> None:
    for name in ("nope.json", "sub", "sub/deep", ".hidden", ".git/config", "part.bin.incomplete"):
        resp = server.get(_file_url(), params={"FilePath": name})
        assert resp.status_code == 404, name
        assert resp.json()["Success"] is False


@pytest.mark.parametrize(
    "path",
    [
        "../tiny/config.json",
        "sub/../../tiny/config.json",
        "/etc/passwd",
        "..",
        "sub\\..\\config.json",
        "config.json\x00",
    ],
)
def test_traversal_refused(server: Server, path: str) -> None:
    resp = server.get(_file_url(), params={"FilePath": path})
    assert resp.status_code in (400, 404)


def test_traversal_in_model_segments(server: Server) -> None:
    for raw in ("/api/v1/models/test/..%2F..%2Fetc/repo", "/api/v1/models/../test/repo"):
        resp = requests.get(server.url + raw, params={"FilePath": "passwd"}, timeout=10)
        assert resp.status_code == 404, raw
    assert server.get(_file_url(), params={"FilePath": ""}).status_code == 400


def test_gz_sibling_not_substituted(server: Server) -> None:
    resp = server.get(
        _file_url(),
        params={"FilePath": "notes.txt"},
        headers={"Accept-Encoding": "gzip, br"},
    )
    assert resp.status_code == 200
    assert "Content-Encoding" not in resp.headers
    assert resp.content == b"plain notes\n"


def test_access_log(server: Server, model_dir: Path) -> None:
    server.get(_file_url(), params={"FilePath": BIG})
    # One line per request with the status and the body bytes, file bodies (sendfile) included.
    pattern = re.compile(
        r'"GET /api/v1/models/test/tiny/repo\?FilePath=sub%2Fdeep%2Fblob.bin" 200 (\d+) bytes'
    )
    deadline = time.monotonic() + 5  # the line is written by another process
    while not (match := pattern.search(server.log.read_text())):
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)
    assert int(match.group(1)) == BIG_SIZE


# --- the real SDK and CLI ------------------------------------------------------------------


def test_sdk_snapshot_download(sdk_env: dict[str, str], tmp_path: Path, model_dir: Path) -> None:
    dest = tmp_path / "dl"
    code = (
        "import sys\n"
        "from modelscope.hub.snapshot_download import snapshot_download\n"
        "print(snapshot_download(sys.argv[1], local_dir=sys.argv[2]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, MODEL, str(dest)],
        env=sdk_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert _tree(dest) == _tree(model_dir)


def test_cli_download(sdk_env: dict[str, str], server: Server, tmp_path: Path, model_dir: Path):
    cli = Path(sys.executable).with_name("modelscope")
    if not cli.exists():
        pytest.skip("the modelscope console script is not installed next to this interpreter")
    env = dict(sdk_env)
    env.pop("MODELSCOPE_ENDPOINT")  # the flag alone must be enough
    dest = tmp_path / "cli"
    cmd = [str(cli), "--endpoint", server.url, "download", MODEL, "--local-dir", str(dest)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _tree(dest) == _tree(model_dir)
    # A missing model is a hub error: exit code 1.
    cmd[4] = "test/nope"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1


def test_fetch_from_mirror_then_serve(
    sdk_env: dict[str, str],
    server: Server,
    tmp_path: Path,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MODELSCOPE_ENDPOINT")  # fetch() must hand the endpoint on itself
    root_b = tmp_path / "mirror-b"
    got = fetch(MODEL, root_b, endpoint=server.url)
    assert got == root_b / "test" / "tiny"
    assert _tree(got) == _tree(model_dir)
    assert not staging_dir(root_b, MODEL).exists()
    # Fetching again repairs a damaged copy: the SDK re-checks every file's digest.
    (got / "config.json").write_text("{}")
    (got / BIG).unlink()
    assert fetch(MODEL, root_b, endpoint=server.url) == got
    assert _tree(got) == _tree(model_dir)
    # A second mirror serves the fetched copy with the same listing.
    server_b = _start(root_b, tmp_path / "mirror-b.log")
    try:
        listing_a = _listing(server).json()["Data"]["Files"]
        listing_b = _listing(server_b).json()["Data"]["Files"]
    finally:
        assert _stop(server_b) == 0
    assert listing_a == listing_b


def test_fetch_errors(sdk_env: dict[str, str], server: Server, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="model test/nope not found"):
        fetch("test/nope", tmp_path, endpoint=server.url)
    # Nothing half-made appears where a mirror would list it.
    assert not (tmp_path / "test").exists()
    with pytest.raises(ValueError):
        fetch("no-owner", tmp_path)


@pytest.mark.parametrize("bad", ["x", "a/b/c", "../x", "a/.b", "/x", "a/"])
def test_split_model_id_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        split_model_id(bad)


# --- hashing, in process -------------------------------------------------------------------


def test_hash_cache_survives_restart(tmp_path: Path) -> None:
    root = tmp_path / "root"
    model_dir = _fill(root)
    n_files = len(ModelStore(root).files(model_dir))

    async def warm() -> int:
        mirror = Mirror(root)
        try:
            await mirror.warm()
        finally:
            mirror.close()
        return mirror.hashed

    assert asyncio.run(warm()) == n_files
    assert asyncio.run(warm()) == 0
    config = model_dir / "config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert asyncio.run(warm()) == 1


def test_concurrent_requests_hash_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    model_dir = _fill(root)
    entry = ModelStore(root).file(model_dir, BIG)
    assert entry is not None

    async def run() -> tuple[list[str], int]:
        mirror = Mirror(root)
        try:
            digests = await asyncio.gather(
                *(mirror.sha256("test", "tiny", entry) for _ in range(5))
            )
        finally:
            mirror.close()
        return digests, mirror.hashed

    digests, hashed = asyncio.run(run())
    assert set(digests) == {_sha256(model_dir / BIG)}
    assert hashed == 1


# --- starting a mirror ------------------------------------------------------------------------


def test_a_mirror_that_cannot_start_says_why(tmp_path: Path) -> None:
    from servekit.mirror.process import MirrorStartError

    log = tmp_path / "mirror.log"
    log.write_text("an earlier run's line\n")
    with pytest.raises(MirrorStartError, match="exited with 2") as failed:
        start_mirror(tmp_path / "missing", log, timeout=START_TIMEOUT)
    assert "is not a directory" in str(failed.value)
    assert "an earlier run's line" not in str(failed.value)  # only what this start wrote


# --- the sandbox's mirror: detached, on a fixed address, stopped by its pid ------------------


def test_the_sandbox_mirror_runs_detached_and_is_stopped_by_its_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from servekit.mirror.process import is_mirror
    from servekit.sandbox import model_mirror
    from servekit.sandbox.state import SandboxPaths

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(model_mirror, "MIRROR_PORT", port)
    paths = SandboxPaths(tmp_path / "sandbox")
    said: list[str] = []
    pid = model_mirror.ensure_mirror(paths, "127.0.0.1", said.append)
    try:
        assert paths.mirror_pid.read_text().strip() == str(pid)
        assert os.getsid(pid) == pid, "the mirror must run in a session of its own"
        assert (paths.model / "config.json").is_file()  # the test model, generated
        listing = requests.get(
            f"http://127.0.0.1:{port}/api/v1/models/Qwen/Qwen3-8B/repo/files", timeout=10
        )
        assert listing.status_code == 200, listing.text
        # A second `up` finds it running and keeps it.
        assert model_mirror.ensure_mirror(paths, "127.0.0.1", said.append) == pid
        assert said[-1] == f"  mirror already running (pid {pid})"
    finally:
        model_mirror.stop_mirror(paths, said.append)
    assert said[-1] == f"  mirror stopped (pid {pid})"
    assert not is_mirror(pid) and not paths.mirror_pid.exists()
    assert model_mirror.running_pid(paths) is None
    assert f"serving {paths.mirror_root.resolve()} on http://127.0.0.1:{port}" in (
        paths.mirror_log.read_text()
    )

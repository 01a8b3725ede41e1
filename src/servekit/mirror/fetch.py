"""Fill a mirror root from an upstream hub with the real ModelScope SDK."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from servekit.mirror.store import STATE_DIR, valid_name

_TAIL_BYTES = 8192
ERROR_PREFIX = "error: "


class FetchError(RuntimeError):
    """The download of a model failed; the message carries the SDK's error."""


def split_model_id(model_id: str) -> tuple[str, str]:
    """``"owner/name"`` -> ``("owner", "name")``; ValueError for anything else."""
    owner, sep, name = model_id.partition("/")
    if not sep or not valid_name(owner) or not valid_name(name):
        raise ValueError(f"model id must look like 'owner/name', got {model_id!r}")
    return owner, name


def staging_dir(dest_root: Path, model_id: str) -> Path:
    """Where ``fetch`` assembles a model before it appears in the mirror."""
    owner, name = split_model_id(model_id)
    return Path(dest_root) / STATE_DIR / "staging" / owner / name


def fetch(
    model_id: str,
    dest_root: Path,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download ``model_id`` into ``dest_root/<owner>/<name>`` and return that directory.

    ``snapshot_download`` of the ModelScope SDK does the work, in a child interpreter so that
    ``endpoint`` (a URL such as ``http://mirror:8090``; default: the SDK's own choice,
    ``MODELSCOPE_ENDPOINT`` or modelscope.cn) reaches it before it reads its configuration.
    The SDK checks every file's size and SHA-256. Its progress goes to stderr.

    The model is assembled in ``dest_root/.servekit/staging/<owner>/<name>`` and moved into
    place only when the SDK succeeded, so a mirror serving ``dest_root`` never lists a model
    that is half downloaded. Updating a model that is already there moves it into staging
    first: the SDK keeps the files that are still intact and fetches the rest, and the model
    is not served until the update has completed. After a failure the partial files stay in
    staging and running ``fetch`` again resumes from them.

    Raises FetchError when the download fails, ValueError for a malformed model id.
    """
    owner, name = split_model_id(model_id)
    final = Path(dest_root) / owner / name
    staging = staging_dir(dest_root, model_id)
    staging.parent.mkdir(parents=True, exist_ok=True)

    with _exclusive(staging.with_name(f"{name}.lock")):
        if final.exists():
            if staging.exists():
                raise FetchError(
                    f"both {final} and an unfinished download in {staging} exist; "
                    "remove one of them and fetch again"
                )
            final.rename(staging)
        _snapshot_download(model_id, staging, revision=revision, endpoint=endpoint)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(final)
        except OSError as exc:
            raise FetchError(
                f"downloaded {model_id} to {staging} but cannot move it to {final}: {exc}"
            ) from exc
    return final


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise fetches of one model (between processes too)."""
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _snapshot_download(
    model_id: str, local_dir: Path, *, revision: str | None, endpoint: str | None
) -> None:
    env = dict(os.environ)
    if endpoint:
        env["MODELSCOPE_ENDPOINT"] = endpoint.rstrip("/")
    cmd = [sys.executable, "-m", "servekit.mirror._download", model_id, str(local_dir)]
    if revision:
        cmd += ["--revision", revision]

    tail = b""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(65536):
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()
            tail = (tail + chunk)[-_TAIL_BYTES:]
        returncode = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if returncode != 0:
        lines = [ln.strip() for ln in tail.decode("utf-8", errors="replace").splitlines()]
        errors = [ln.removeprefix(ERROR_PREFIX) for ln in lines if ln.startswith(ERROR_PREFIX)]
        reason = errors[-1] if errors else next((ln for ln in reversed(lines) if ln), "no output")
        raise FetchError(f"download of {model_id} failed (exit code {returncode}): {reason}")

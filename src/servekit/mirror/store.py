"""The mirror's storage: models as plain directories under a root, and a persistent hash cache.

Layout: ``ROOT/<owner>/<name>/<files...>`` (subdirectories allowed). Names starting with a dot
are never listed or served, which keeps download leftovers (``.cache``, ``._____temp``) and the
mirror's own state (``ROOT/.servekit/``) out of the listings while the model directories stay
untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

STATE_DIR = ".servekit"
CACHE_FILE = "sha256-cache.json"
_CACHE_VERSION = 1

# Suffix of files the ModelScope SDK is still writing.
PARTIAL_SUFFIX = ".incomplete"

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class BadPath(ValueError):
    """A requested path that is not a plain relative path inside a model."""


def valid_name(segment: str) -> bool:
    """An owner or model name: letters, digits, '.', '_' and '-', not starting with a dot."""
    return bool(_NAME_RE.fullmatch(segment))


def clean_relpath(raw: str) -> str:
    """Normalise a client-supplied path inside a model; refuse anything that could leave it.

    Returns the path with '/' separators and no empty or '.' segments. Raises BadPath for
    absolute paths, backslashes, NUL bytes and '..' segments.
    """
    if not raw or "\x00" in raw or "\\" in raw or raw.startswith("/"):
        raise BadPath(f"invalid path {raw!r}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise BadPath(f"invalid path {raw!r}")
    return "/".join(parts)


def is_hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


@dataclass(frozen=True)
class FileEntry:
    """One servable file of a model."""

    path: str  # relative to the model directory, '/'-separated
    abspath: Path
    size: int
    mtime_ns: int


class ModelStore:
    """Read-only view of the models under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, owner: str, name: str) -> Path | None:
        """The directory of model ``owner/name``, or None when there is no such model."""
        if not (valid_name(owner) and valid_name(name)):
            return None
        path = self.root / owner / name
        return path if path.is_dir() else None

    def models(self) -> list[tuple[str, str]]:
        """Every ``(owner, name)`` under the root, sorted."""
        found = []
        for owner in _sorted_dirs(self.root):
            found.extend((owner.name, model.name) for model in _sorted_dirs(owner))
        return found

    def files(self, model_dir: Path) -> list[FileEntry]:
        """Every servable file of a model, sorted by path.

        Hidden names, files still being downloaded, non-regular files and symbolic links that
        lead out of the model directory are left out.
        """
        base = model_dir.resolve()
        entries = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.startswith(".") or filename.endswith(PARTIAL_SUFFIX):
                    continue
                relpath = Path(dirpath, filename).relative_to(base).as_posix()
                entry = self._entry(base, relpath)
                if entry is not None:
                    entries.append(entry)
        entries.sort(key=lambda e: e.path)
        return entries

    def file(self, model_dir: Path, relpath: str) -> FileEntry | None:
        """The file at ``relpath`` (already cleaned) if the model serves it, else None."""
        if is_hidden(relpath) or relpath.endswith(PARTIAL_SUFFIX):
            return None
        return self._entry(model_dir.resolve(), relpath)

    def is_dir(self, model_dir: Path, relpath: str) -> bool:
        if is_hidden(relpath):
            return False
        base = model_dir.resolve()
        target = (base / relpath).resolve()
        return target.is_relative_to(base) and target.is_dir()

    @staticmethod
    def _entry(base: Path, relpath: str) -> FileEntry | None:
        path = base / relpath
        try:
            resolved = path.resolve(strict=True)
            st = resolved.stat()
        except (OSError, RuntimeError):
            return None
        if not resolved.is_relative_to(base) or not stat.S_ISREG(st.st_mode):
            return None
        return FileEntry(path=relpath, abspath=resolved, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _sorted_dirs(path: Path) -> list[Path]:
    try:
        children = [p for p in path.iterdir() if valid_name(p.name) and p.is_dir()]
    except OSError:
        return []
    return sorted(children, key=lambda p: p.name)


class HashCache:
    """SHA-256 digests keyed by file, valid while the file's size and mtime are unchanged.

    Persisted as JSON at ``ROOT/.servekit/sha256-cache.json`` so a restarted mirror does not
    re-read every model. If that file cannot be written the cache lives in memory only.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / STATE_DIR / CACHE_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._dirty = False
        self._warned = False
        self._load()

    @staticmethod
    def key(owner: str, name: str, relpath: str) -> str:
        return str(PurePosixPath(owner, name, relpath))

    def get(self, key: str, size: int, mtime_ns: int) -> str | None:
        with self._lock:
            hit = self._entries.get(key)
        if hit and hit.get("size") == size and hit.get("mtime_ns") == mtime_ns:
            return hit.get("sha256")
        return None

    def put(self, key: str, size: int, mtime_ns: int, sha256: str) -> None:
        with self._lock:
            self._entries[key] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha256}
            self._dirty = True

    def save(self) -> None:
        """Write the cache if it changed since the last save (atomically; errors are logged)."""
        with self._lock:
            if not self._dirty:
                return
            snapshot = {"version": _CACHE_VERSION, "files": dict(sorted(self._entries.items()))}
            self._dirty = False
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(snapshot, f, indent=1)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            except OSError as exc:
                if not self._warned:
                    log.warning(
                        "cannot write hash cache %s (%s); keeping it in memory only", self.path, exc
                    )
                    self._warned = True

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable hash cache %s: %s", self.path, exc)
            return
        if isinstance(data, dict) and data.get("version") == _CACHE_VERSION:
            files = data.get("files")
            if isinstance(files, dict):
                self._entries = {k: v for k, v in files.items() if isinstance(v, dict)}

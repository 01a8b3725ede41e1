"""A ModelScope-compatible model mirror over HTTP (the part of the hub API that downloads use).

The unmodified ModelScope SDK and CLI download from it when pointed at it with
``MODELSCOPE_ENDPOINT=http://HOST:PORT`` or ``--endpoint``. Files go out through
``aiohttp.web.FileResponse``, which hands them to the kernel (sendfile) and answers ``Range``
requests with 206, so resumed downloads work and large files never pass through Python buffers.

Routes:

- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=&Root=``: the file listing
  with exact sizes and SHA-256 digests;
- ``GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=``: one file;
- ``GET /api/v1/models/{owner}/{name}/revisions``: a single ``master`` branch;
- ``GET /api/v1/models/{owner}/{name}``: basic model information;
- ``GET /healthz``: 200 ``ok`` once the start-up hashing pass is done, 503 before;
- ``GET /servekit/stats``: what the mirror has sent since it started, per file (JSON).

Every revision name is accepted and served from the one stored copy; the listing echoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger, AbstractStreamWriter

from servekit.mirror.store import BadPath, FileEntry, HashCache, ModelStore, clean_relpath

log = logging.getLogger("servekit.mirror")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090
DEFAULT_REVISION = "master"


# Suffixes the hub stores through Git LFS; the flag is informational for clients.
_LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".npz"}
)
_LFS_MIN_SIZE = 10 * 1024 * 1024

_MIRROR: web.AppKey[Mirror] = web.AppKey("mirror")


class _IdentityFileResponse(web.FileResponse):
    """FileResponse that always sends the file itself, and counts what it sent.

    aiohttp's FileResponse substitutes a sibling ``NAME.gz`` or ``NAME.br`` when the client
    accepts that encoding; in a model repository such a sibling is a different file of its own.
    """

    def __init__(self, path: Path, *, chunk_size: int, stats: ServedStats, stats_key: str):
        super().__init__(path, chunk_size=chunk_size)
        self._stats = stats
        self._stats_key = stats_key

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        # FileResponse sends the whole body (sendfile) inside prepare().
        try:
            writer = await super().prepare(request)
        except BaseException:
            self._stats.record(self._stats_key, 0, complete=False)
            raise
        has_body = request.method == "GET" and self.status in (200, 206)
        sent = (self.content_length or 0) if has_body else 0
        self._stats.record(self._stats_key, sent, complete=True)
        return writer

    def _get_file_path_stat_encoding(
        self, accept_encoding: str
    ) -> tuple[Path | None, os.stat_result, str | None]:
        return super()._get_file_path_stat_encoding("")


class AccessLogger(AbstractAccessLogger):
    """One line per request: client, request, status, body bytes, seconds.

    aiohttp's own ``%b`` misses file bodies, which go out through sendfile; for those the
    count is the length announced in Content-Length.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        sent = response.body_length
        if request.method == "HEAD" or response.status in (204, 304):
            sent = 0
        elif response.content_length is not None:
            sent = response.content_length
        self.logger.info(
            '%s "%s %s" %d %d bytes %.3f s',
            request.remote,
            request.method,
            request.path_qs,
            response.status,
            sent,
            time,
        )


class ServedStats:
    """What the mirror has sent since it started, per file: ``GET /servekit/stats``.

    Per file ``owner/name/path``: ``requests`` (file requests answered), ``bytes`` (body bytes
    of the responses handed to the kernel in full: the whole file for a 200, the range for a
    206) and ``aborted`` (responses cut off, e.g. when the client went away; the bytes that
    did go out before that are not known exactly and are not counted).
    """

    def __init__(self) -> None:
        self.files: dict[str, dict[str, int]] = {}

    def record(self, key: str, sent: int, *, complete: bool) -> None:
        entry = self.files.setdefault(key, {"requests": 0, "bytes": 0, "aborted": 0})
        entry["requests"] += 1
        if complete:
            entry["bytes"] += sent
        else:
            entry["aborted"] += 1

    def snapshot(self) -> dict[str, object]:
        files = {key: dict(value) for key, value in sorted(self.files.items())}
        return {
            "requests": sum(f["requests"] for f in files.values()),
            "bytes": sum(f["bytes"] for f in files.values()),
            "aborted": sum(f["aborted"] for f in files.values()),
            "files": files,
        }


class Mirror:
    """State shared by the handlers: the store, the hash cache and the hashing threads."""

    def __init__(self, root: Path, *, hash_workers: int | None = None) -> None:
        self.root = Path(root)
        self.store = ModelStore(self.root)
        self.cache = HashCache(self.root)
        workers = hash_workers or min(4, os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256")
        self._inflight: dict[tuple[str, int, int], asyncio.Future[tuple[str, bool]]] = {}
        self.ready = False
        self.warm_progress = (0, 0)
        self.hashed = 0  # files read and hashed since start (cache misses)
        self.stats = ServedStats()

    async def sha256(self, owner: str, name: str, entry: FileEntry) -> str:
        """The file's SHA-256: from the cache, or computed in a hashing thread.

        Concurrent requests for the same file share one computation, and a client that hangs
        up does not cancel it.
        """
        key = HashCache.key(owner, name, entry.path)
        cached = self.cache.get(key, entry.size, entry.mtime_ns)
        if cached:
            return cached
        ident = (key, entry.size, entry.mtime_ns)
        future = self._inflight.get(ident)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, _hash_file, entry)
            self._inflight[ident] = future
            future.add_done_callback(lambda f: self._hashed(ident, f))
        digest, _ = await asyncio.shield(future)
        return digest

    def _hashed(self, ident: tuple[str, int, int], future: asyncio.Future) -> None:
        self._inflight.pop(ident, None)
        if future.cancelled() or future.exception() is not None:
            return
        digest, unchanged = future.result()
        self.hashed += 1
        if unchanged:  # a file modified while being read is hashed again next time
            key, size, mtime_ns = ident
            self.cache.put(key, size, mtime_ns, digest)

    async def save_cache(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.cache.save)

    async def warm(self) -> None:
        """Hash every file of every model once, so that listings answer at once afterwards.

        The SDK gives a listing request about 15 s; hashing a 16 GB model from a cold disk
        takes longer than that, so the mirror does it before it reports ready.
        """
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        models = await loop.run_in_executor(None, self.store.models)
        work: list[tuple[str, str, FileEntry]] = []
        for owner, name in models:
            model_dir = self.store.root / owner / name
            files = await loop.run_in_executor(None, self.store.files, model_dir)
            work.extend((owner, name, entry) for entry in files)
        total_bytes = sum(entry.size for _, _, entry in work)
        done = 0
        self.warm_progress = (0, len(work))

        async def one(owner: str, name: str, entry: FileEntry) -> None:
            nonlocal done
            try:
                await self.sha256(owner, name, entry)
            except OSError as exc:
                log.warning("cannot hash %s/%s/%s: %s", owner, name, entry.path, exc)
            done += 1
            self.warm_progress = (done, len(work))

        await asyncio.gather(*(one(*item) for item in work))
        await self.save_cache()
        self.ready = True
        log.info(
            "ready: %d models, %d files, %.1f MB (%d files hashed, the rest cached) in %.1f s",
            len(models),
            len(work),
            total_bytes / 1e6,
            self.hashed,
            time.monotonic() - started,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _hash_file(entry: FileEntry) -> tuple[str, bool]:
    """SHA-256 of the file, and whether it still has the size and mtime it was listed with."""
    with entry.abspath.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        st = os.fstat(f.fileno())
    return digest, (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns)


def _ok(data: object) -> web.Response:
    return web.json_response(
        {
            "Code": 200,
            "Success": True,
            "Message": "success",
            "RequestId": str(uuid.uuid4()),
            "Data": data,
        }
    )


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {
            "Code": status,
            "Success": False,
            "Message": message,
            "RequestId": str(uuid.uuid4()),
            "Data": None,
        },
        status=status,
    )


def _model(request: web.Request) -> tuple[Mirror, str, str, Path | None]:
    mirror = request.app[_MIRROR]
    owner = request.match_info["owner"]
    name = request.match_info["name"]
    return mirror, owner, name, mirror.store.model_dir(owner, name)


def _not_found(owner: str, name: str) -> web.Response:
    return _error(404, f"model {owner}/{name} not found")


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("true", "1", "yes")


def _is_lfs(entry: FileEntry) -> bool:
    return entry.size >= _LFS_MIN_SIZE or PurePosixPath(entry.path).suffix in _LFS_SUFFIXES


async def _with_digests(
    mirror: Mirror, owner: str, name: str, files: list[FileEntry]
) -> list[tuple[FileEntry, str]]:
    """``files`` paired with their SHA-256 digests (hashing what the cache lacks)."""
    digests = await asyncio.gather(*(mirror.sha256(owner, name, f) for f in files))
    await mirror.save_cache()
    return list(zip(files, digests, strict=True))


def _unreadable(owner: str, name: str, exc: OSError) -> web.Response:
    log.error("cannot read a file of %s/%s: %s", owner, name, exc)
    return _error(500, f"cannot read a file of model {owner}/{name}")


async def list_files(request: web.Request) -> web.Response:
    mirror, owner, name, model_dir = _model(request)
    if model_dir is None:
        return _not_found(owner, name)
    revision = request.query.get("Revision") or DEFAULT_REVISION
    recursive = _flag(request.query.get("Recursive"), default=False)
    root = ""
    if request.query.get("Root", "").strip("/"):
        try:
            root = clean_relpath(request.query["Root"].strip("/"))
        except BadPath as exc:
            return _error(400, str(exc))
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, mirror.store.is_dir, model_dir, root):
            return _error(404, f"path {root} not found in model {owner}/{name}")
    prefix = f"{root}/" if root else ""

    loop = asyncio.get_running_loop()
    all_files = await loop.run_in_executor(None, mirror.store.files, model_dir)
    files = [f for f in all_files if f.path.startswith(prefix)]
    subdirs: list[str] = []
    if not recursive:
        direct = []
        for f in files:
            rest = f.path[len(prefix) :]
            if "/" in rest:
                subdir = prefix + rest.split("/", 1)[0]
                if subdir not in subdirs:
                    subdirs.append(subdir)
            else:
                direct.append(f)
        files = direct
    try:
        listing = await _with_digests(mirror, owner, name, files)
    except OSError as exc:
        return _unreadable(owner, name, exc)

    entries: list[dict[str, object]] = [
        {
            "Name": PurePosixPath(d).name,
            "Path": d,
            "Type": "tree",
            "Size": 0,
            "Sha256": "",
            "Revision": revision,
            "IsLFS": False,
        }
        for d in subdirs
    ]
    entries.extend(
        {
            "Name": PurePosixPath(f.path).name,
            "Path": f.path,
            "Type": "blob",
            "Size": f.size,
            "Sha256": digest,
            "Revision": revision,
            "IsLFS": _is_lfs(f),
        }
        for f, digest in listing
    )
    return _ok({"Files": entries})


async def get_file(request: web.Request) -> web.StreamResponse:
    mirror, owner, name, model_dir = _model(request)
    if model_dir is None:
        return _not_found(owner, name)
    raw = request.query.get("FilePath")
    if not raw:
        return _error(400, "FilePath is required")
    try:
        relpath = clean_relpath(raw)
    except BadPath as exc:
        return _error(400, str(exc))
    loop = asyncio.get_running_loop()
    entry = await loop.run_in_executor(None, mirror.store.file, model_dir, relpath)
    if entry is None:
        return _error(404, f"file {relpath} not found in model {owner}/{name}")
    return _IdentityFileResponse(
        entry.abspath,
        chunk_size=1024 * 1024,
        stats=mirror.stats,
        stats_key=HashCache.key(owner, name, relpath),
    )


def commit_id(listing: list[tuple[FileEntry, str]]) -> str:
    """A 40-hex id that changes whenever a file's path, size or content changes."""
    lines = "".join(f"{f.path}\0{f.size}\0{digest}\n" for f, digest in listing)
    return hashlib.sha1(lines.encode(), usedforsecurity=False).hexdigest()


async def revisions(request: web.Request) -> web.Response:
    mirror, owner, name, model_dir = _model(request)
    if model_dir is None:
        return _not_found(owner, name)
    loop = asyncio.get_running_loop()
    files = await loop.run_in_executor(None, mirror.store.files, model_dir)
    try:
        listing = await _with_digests(mirror, owner, name, files)
    except OSError as exc:
        return _unreadable(owner, name, exc)
    branch = {"Revision": DEFAULT_REVISION, "CommitId": commit_id(listing)}
    return _ok({"RevisionMap": {"Branches": [branch], "Tags": []}})


async def model_info(request: web.Request) -> web.Response:
    _, owner, name, model_dir = _model(request)
    if model_dir is None:
        return _not_found(owner, name)
    return _ok({"Path": owner, "Name": name, "ModelId": f"{owner}/{name}", "Revision": "master"})


async def healthz(request: web.Request) -> web.Response:
    mirror = request.app[_MIRROR]
    if mirror.ready:
        return web.Response(text="ok\n")
    done, total = mirror.warm_progress
    return web.Response(status=503, text=f"starting: hashed {done} of {total} files\n")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_MIRROR].stats.snapshot())


def make_app(root: Path, *, hash_workers: int | None = None) -> web.Application:
    """The mirror application serving the models under ``root``.

    On start-up it hashes every file not yet in the hash cache (``/healthz`` answers 503 until
    that is done); models added later are hashed on their first listing.
    """
    app = web.Application()
    mirror = Mirror(root, hash_workers=hash_workers)
    app[_MIRROR] = mirror
    base = "/api/v1/models/{owner}/{name}"
    app.router.add_get(f"{base}/repo/files", list_files)
    app.router.add_get(f"{base}/repo", get_file)
    app.router.add_get(f"{base}/revisions", revisions)
    app.router.add_get(base, model_info)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/servekit/stats", stats)

    async def warm() -> None:
        try:
            await mirror.warm()
        except Exception:
            # Listings still hash on demand; report ready rather than failing health forever.
            log.exception("start-up hashing failed")
            mirror.ready = True

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(warm())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        mirror.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve(root: Path, host: str, port: int) -> None:
    runner = web.AppRunner(
        make_app(root),
        access_log_class=AccessLogger,
        access_log=logging.getLogger("servekit.mirror.access"),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port  # port 0: the one picked
        print(f"serving {root} on {_url(host, bound)}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not available outside the main thread; Ctrl-C then stops the loop as usual.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(root: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the models under ``root`` until SIGINT or SIGTERM. Port 0 picks a free port."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"mirror root {root} is not a directory")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
    asyncio.run(_serve(root, host, port))

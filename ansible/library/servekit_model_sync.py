#!/usr/bin/python
"""Download a ModelScope model into a versioned directory, verified, switched atomically."""

from __future__ import annotations

DOCUMENTATION = r"""
module: servekit_model_sync
short_description: Download, verify and atomically publish a ModelScope model
description:
  - Lists the model's files on a ModelScope-compatible endpoint, checks free disk,
    downloads into a staging directory with the real C(modelscope) SDK, verifies every
    file's SHA-256 against the listing, writes a manifest, then renames the staging
    directory to a versioned directory and switches the C(current) symlink atomically.
  - A re-run over an unchanged model compares the manifest with each file's size and
    mtime only (O(files)); C(verify=deep) re-hashes every byte and re-fetches bad files.
  - When the revision is a branch the endpoint's C(/revisions) answer names, its commit id is
    recorded in the manifest and returned, once it resolved the same before and after the
    listing.
  - Runs on one model are serialised by an exclusive C(flock) on C(.servekit.lock) in the
    model's directory; a run that waited finds the work done. Holding it, a run removes
    what interrupted runs left (other revisions' C(.staging/*), C(.replaced-*)) and then
    prunes versions beyond O(keep_versions), least recently made current first. Never pruned
    are the version C(current) pointed to before the run, the run's own, and those of
    O(protect).
    Which version was current when is kept in C(.servekit-versions.json).
  - Check mode takes no lock and removes nothing.
  - Must run with a Python interpreter that has the C(modelscope) SDK installed.
options:
  model_id: {type: str, required: true, description: Owner/name of the model.}
  revision: {type: str, default: master, description: Revision to download.}
  endpoint: {type: str, required: true, description: ModelScope API endpoint.}
  root: {type: path, required: true, description: Directory holding all models.}
  verify:
    {type: str, default: quick, choices: [quick, deep], description: How to check an existing copy.}
  max_workers: {type: int, default: 4, description: Parallel file downloads.}
  keep_versions:
    type: int
    default: 2
    description:
      - Versions kept on disk, the current one included.
      - Protected versions count; when they alone are more, all of them are kept and the result
        says so (RV(keep_versions_exceeded)).
  protect:
    type: list
    elements: str
    default: []
    description:
      - Versions never pruned, besides the previous and the new one. Each is a revision (or
        version directory) name, C(current), or an absolute path; a path inside the model's
        directory protects the version it lies in (a C(current) link, the version it points
        to); other paths are ignored. Resolved before C(current) moves.
  lock_timeout:
    type: int
    default: 3600
    description:
      - Seconds to wait for another run on the same model to finish (a download can take
        long); 0 fails at once when the model is locked.
  space_margin:
    type: float
    default: 0.05
    description: Extra free space required, as a share of the model size.
author: servekit
"""

RETURN = r"""
path: {type: str, description: The version's directory.}
commit_id: {type: str, description: "The commit a branch revision resolved to (only when known)."}
waited_for_lock: {type: bool, description: Whether another run on the model held the lock first.}
collected:
  type: list
  description: What interrupted runs left and this run removed, relative to the model's directory.
pruned: {type: list, description: Versions removed beyond keep_versions.}
freed_bytes:
  type: int
  description: Bytes of the files C(collected) and C(pruned) removed that had no other hard link.
protected: {type: list, description: Versions on disk that pruning had to keep.}
keep_versions_exceeded:
  type: bool
  description: More versions are protected than keep_versions allows; all of them were kept.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.parse
import urllib.request

from ansible.module_utils.basic import AnsibleModule

MANIFEST = ".servekit-manifest.json"
LOCK_FILE = ".servekit.lock"
HISTORY_FILE = ".servekit-versions.json"
STAGING = ".staging"
REPLACED = ".replaced-"


def list_files(endpoint, model_id, revision):
    query = urllib.parse.urlencode({"Revision": revision, "Recursive": "True"})
    url = f"{endpoint.rstrip('/')}/api/v1/models/{model_id}/repo/files?{query}"
    with urllib.request.urlopen(url, timeout=60) as resp:
        body = json.load(resp)
    data = body.get("Data") or {}
    files = data.get("Files", []) if isinstance(data, dict) else data
    out = {}
    for entry in files:
        if entry.get("Type") == "tree":
            continue
        path = entry.get("Path") or entry.get("Name")
        out[path] = {"size": int(entry["Size"]), "sha256": entry.get("Sha256") or ""}
    return out


def branch_commit(endpoint, model_id, revision):
    """The commit id of branch ``revision`` from the hub's ``/revisions``, or None: the route is
    optional, and a tag or a commit is not among the branches."""
    url = f"{endpoint.rstrip('/')}/api/v1/models/{model_id}/revisions"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            branches = json.load(resp)["Data"]["RevisionMap"]["Branches"] or []
    except Exception:  # no such route, HTTP and JSON errors alike: the commit stays unknown
        return None
    for branch in branches:
        if isinstance(branch, dict) and branch.get("Revision") == revision:
            return branch.get("CommitId") or None
    return None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory):
    try:
        with open(os.path.join(directory, MANIFEST)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def quick_check(directory, listing):
    """Files unchanged since verification? Compares size and mtime with the manifest."""
    manifest = read_manifest(directory)
    if not manifest:
        return ["(no manifest)"]
    entries = manifest.get("files", {})
    problems = []
    for path, want in listing.items():
        entry = entries.get(path)
        full = os.path.join(directory, path)
        if entry is None or entry["sha256"] != want["sha256"] or entry["size"] != want["size"]:
            problems.append(path)
            continue
        try:
            st = os.stat(full)
        except OSError:
            problems.append(path)
            continue
        if st.st_size != entry["size"] or st.st_mtime_ns != entry["mtime_ns"]:
            problems.append(path)
    return problems


def deep_check(directory, listing):
    bad = []
    for path, want in listing.items():
        full = os.path.join(directory, path)
        if (
            not os.path.isfile(full)
            or os.path.getsize(full) != want["size"]
            or sha256_of(full) != want["sha256"]
        ):
            bad.append(path)
    return bad


def download(module, staging, p):
    os.environ["MODELSCOPE_ENDPOINT"] = p["endpoint"].rstrip("/")
    os.environ.setdefault("MODELSCOPE_CACHE", os.path.join(p["root"], ".cache", "modelscope"))
    os.environ["MODELSCOPE_DOWNLOAD_INTRA_CLOUD"] = "false"
    # The SDK prints progress on stdout; the module's stdout must stay pure JSON.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    error = None
    try:
        from modelscope.hub.snapshot_download import snapshot_download

        snapshot_download(
            p["model_id"], revision=p["revision"], local_dir=staging, max_workers=p["max_workers"]
        )
    except Exception as exc:  # the SDK raises many types; all mean "not downloaded"
        error = exc
    finally:
        sys.stdout = real_stdout
    if error is not None:  # fail_json prints the result: only once stdout is back
        module.fail_json(
            msg=f"download of {p['model_id']}@{p['revision']} from {p['endpoint']} failed: "
            f"{error}. The served model is untouched; completed files are kept and the next "
            "run resumes.",
            staging=staging,
        )


def write_json(path, data):
    """Replace ``path`` with ``data`` atomically (a reader sees the old or the new file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(directory, listing, p, commit):
    files = {}
    for path, want in listing.items():
        st = os.stat(os.path.join(directory, path))
        files[path] = {"size": st.st_size, "sha256": want["sha256"], "mtime_ns": st.st_mtime_ns}
    manifest = {
        "model_id": p["model_id"],
        "revision": p["revision"],
        "endpoint": p["endpoint"],
        "verified_at": int(time.time()),
        "files": files,
    }
    if commit:
        manifest["commit_id"] = commit
    write_json(os.path.join(directory, MANIFEST), manifest)


def record_commit(directory, commit):
    """Note the commit of a version verified before its branch could be resolved."""
    manifest = read_manifest(directory)
    if commit and manifest and manifest.get("commit_id") != commit:
        manifest["commit_id"] = commit
        write_json(os.path.join(directory, MANIFEST), manifest)


def switch_current(model_dir, version_name):
    link = os.path.join(model_dir, "current")
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(version_name, tmp)
    os.replace(tmp, link)


# --- one run at a time per model -------------------------------------------------------------


class LockExpired(Exception):
    pass


def _expire(signum, frame):
    raise LockExpired


def lock_within(fd, seconds):
    """Wait up to ``seconds`` for the exclusive lock on ``fd``; False if it stayed taken."""
    if seconds <= 0:
        return False
    # flock() has no timeout of its own: an alarm interrupts the wait.
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except LockExpired:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def lock_now(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def model_lock(module, model_dir, p):
    """Hold the model's lock for the ``with`` block; yields whether another run held it first.

    The kernel drops a flock when its holder exits, however it exits: a killed run leaves no
    stale lock behind."""
    path = os.path.join(model_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = not lock_now(fd)
        if waited and not lock_within(fd, p["lock_timeout"]):
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
            module.fail_json(
                msg=f"gave up after {p['lock_timeout']} s waiting for the lock {path}: another "
                f"run on {p['model_id']} holds it ({holder}), most likely still downloading. "
                "Let it finish and run again, or wait longer (lock_timeout, role variable "
                "model_lock_timeout). The lock ends with the process holding it: there is "
                "nothing to delete.",
                lock=path,
            )
        os.ftruncate(fd, 0)
        note = f"pid {os.getpid()}, {p['model_id']}@{p['revision']}, since {time.ctime()}\n"
        os.pwrite(fd, note.encode(), 0)
        yield waited
    finally:
        os.close(fd)


# --- what the store holds --------------------------------------------------------------------


def version_named(model_dir, entry):
    """The version directory ``entry`` means: a revision or version name, ``current``, or an
    absolute path (the version it lies in). None when it names no version of this model."""
    path = entry if entry.startswith("/") else os.path.join(model_dir, entry.replace("/", "_"))
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(model_dir))
    name = rel.split(os.sep)[0]
    if name in ("", ".", "..", "current") or name.startswith("."):
        return None
    return name


def published_versions(model_dir):
    names = []
    for name in os.listdir(model_dir):
        full = os.path.join(model_dir, name)
        if name.startswith(".") or name == "current" or os.path.islink(full):
            continue
        if os.path.isdir(full):
            names.append(name)
    return names


def read_history(model_dir):
    """The versions in the order they were made current, the latest last."""
    try:
        with open(os.path.join(model_dir, HISTORY_FILE)) as fh:
            entries = json.load(fh)["made_current"]
        return [e for e in entries if isinstance(e.get("version"), str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def made_current(history, name):
    if name is None or (history and history[-1]["version"] == name):
        return history
    kept = [e for e in history if e["version"] != name]
    return [*kept, {"version": name, "at": int(time.time())}]


def bytes_freed_by_removing(path):
    """Size of the files under ``path`` whose every hard link lies under ``path`` too."""
    inodes = {}
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            links, seen, size = inodes.get((st.st_dev, st.st_ino), (st.st_nlink, 0, st.st_size))
            inodes[(st.st_dev, st.st_ino)] = (links, seen + 1, size)
    return sum(size for links, seen, size in inodes.values() if seen >= links)


def remove(path):
    """Delete a file or a directory tree; returns the bytes freed."""
    if os.path.isdir(path) and not os.path.islink(path):
        freed = bytes_freed_by_removing(path)
        shutil.rmtree(path)
        return freed
    freed = os.lstat(path).st_size if os.lstat(path).st_nlink == 1 else 0
    os.unlink(path)
    return freed


def leftovers(model_dir, keep_staging):
    """What interrupted runs left, relative to ``model_dir``: staging directories of other
    revisions (``keep_staging``'s may be resumed) and versions set aside while replaced."""
    staging_root = os.path.join(model_dir, STAGING)
    staged = sorted(os.listdir(staging_root)) if os.path.isdir(staging_root) else []
    found = [os.path.join(STAGING, name) for name in staged if name != keep_staging]
    found += sorted(n for n in os.listdir(model_dir) if n.startswith(REPLACED))
    return found


def collect(model_dir, paths, result):
    for rel in paths:
        result["freed_bytes"] += remove(os.path.join(model_dir, rel))
        result["collected"].append(rel)
    with contextlib.suppress(OSError):  # only once it is empty
        os.rmdir(os.path.join(model_dir, STAGING))


def prune(module, model_dir, keep, protected, history, result):
    """Remove the versions beyond ``keep``, least recently current first; ``protected`` (a
    {version: why} map) stays, even beyond ``keep``."""
    versions = published_versions(model_dir)
    kept = {name: why for name, why in protected.items() if name in versions}
    order = {entry["version"]: i for i, entry in enumerate(history)}

    def recency(name):
        return order.get(name, -1), os.path.getmtime(os.path.join(model_dir, name))

    others = sorted((v for v in versions if v not in kept), key=recency, reverse=True)
    for name in others[max(keep - len(kept), 0) :]:
        result["freed_bytes"] += remove(os.path.join(model_dir, name))
        result["pruned"].append(name)
    result["protected"] = sorted(kept)
    if len(kept) > keep:
        result["keep_versions_exceeded"] = True
        module.warn(
            f"keeping {len(kept)} versions of {module.params['model_id']}, more than "
            f"keep_versions={keep}, because each is protected: "
            + ", ".join(f"{name} ({why})" for name, why in sorted(kept.items()))
        )


# --- one run ---------------------------------------------------------------------------------


def fetch_listing(module, p, target, result):
    """The revision's listing; None when the endpoint cannot be reached but the same revision
    is verified on disk (the run then keeps it)."""
    try:
        return list_files(p["endpoint"], p["model_id"], p["revision"])
    except Exception as exc:  # network, HTTP and JSON errors alike
        if os.path.isdir(target) and not quick_check(target, read_listing_from_manifest(target)):
            module.warn(
                f"cannot list {p['model_id']} at {p['endpoint']} ({exc}); "
                "keeping the verified local copy"
            )
            result["files"] = len(read_listing_from_manifest(target))
            return None
        module.fail_json(
            msg=f"cannot list model {p['model_id']}@{p['revision']} at {p['endpoint']}: {exc}"
        )


def confirmed(module, p, commit):
    """``commit`` if the branch still points at it after the listing: then the listing is that
    commit's."""
    if commit is None:
        return None
    again = branch_commit(p["endpoint"], p["model_id"], p["revision"])
    if again != commit:
        module.warn(
            f"branch {p['revision']} of {p['model_id']} resolved to {commit}, then to {again}: "
            "its commit is not recorded. Pin a tag or a commit for exact roll-backs."
        )
        return None
    return commit


def intact(module, target, listing, p, commit, result):
    """Whether the version on disk matches the listing (a manifest gone stale is rewritten)."""
    bad = deep_check(target, listing) if p["verify"] == "deep" else quick_check(target, listing)
    if not bad:
        if not module.check_mode:
            if p["verify"] == "deep":
                write_manifest_if_stale(target, listing, p, commit)
            record_commit(target, commit)
        return True
    result["reverify"] = bad[:20]
    if p["verify"] == "quick" and bad != ["(no manifest)"]:
        # Size or mtime moved since verification: find out with a full hash.
        bad = deep_check(target, listing)
        if not bad:
            if not module.check_mode:
                write_manifest(target, listing, p, commit)
            result["changed"] = True
            return True
    result["refetch"] = bad[:20]
    return False


def make_current(module, model_dir, version_name, result):
    link = os.path.join(model_dir, "current")
    if os.path.islink(link) and os.readlink(link) == version_name:
        return
    result["changed"] = True
    if not module.check_mode:
        switch_current(model_dir, version_name)


def stage_and_publish(module, model_dir, version_name, listing, p, commit, result):
    target = os.path.join(model_dir, version_name)
    staging = os.path.join(model_dir, STAGING, version_name)
    os.makedirs(staging, exist_ok=True)
    if os.path.isdir(target):
        # Start the staging copy from the verified files of the current version (hard links).
        for path in listing:
            src, dst = os.path.join(target, path), os.path.join(staging, path)
            if path in result.get("refetch", []) or os.path.exists(dst) or not os.path.isfile(src):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(src, dst)

    staged = sum(
        os.path.getsize(os.path.join(staging, f))
        for f in listing
        if os.path.isfile(os.path.join(staging, f))
    )
    need = int((result["bytes"] - staged) + result["bytes"] * p["space_margin"])
    free = shutil.disk_usage(staging).free
    if free < need:
        module.fail_json(
            msg=f"not enough disk for {p['model_id']}@{p['revision']} under {p['root']}: "
            f"{need} bytes required ({result['bytes']} model bytes, {staged} already staged, "
            f"{p['space_margin']:.0%} margin), {free} bytes available. Free space or point "
            "servekit_model_root at a bigger filesystem.",
            required_bytes=need,
            available_bytes=free,
        )

    download(module, staging, p)
    bad = deep_check(staging, listing)
    if bad:
        module.fail_json(
            msg=f"downloaded files do not match the listing's SHA-256: {bad}. "
            "The served model is untouched.",
            staging=staging,
        )
    write_manifest(staging, listing, p, commit)
    top_level = {name.split("/")[0] for name in listing}
    for leftover in os.listdir(staging):
        if leftover not in top_level and leftover != MANIFEST:
            full = os.path.join(staging, leftover)
            shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)
    if os.path.isdir(target):
        aside = os.path.join(model_dir, f"{REPLACED}{version_name}-{int(time.time())}")
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside)
        result["replaced"] = True
    else:
        os.rename(staging, target)
    switch_current(model_dir, version_name)


def sync_version(module, model_dir, version_name, listing, p, commit, result):
    """Make ``version_name`` a verified copy of the listing and point ``current`` at it."""
    target = os.path.join(model_dir, version_name)
    if os.path.isdir(target) and intact(module, target, listing, p, commit, result):
        make_current(module, model_dir, version_name, result)
        return
    result["changed"] = True
    if not module.check_mode:
        stage_and_publish(module, model_dir, version_name, listing, p, commit, result)


def run(module):
    p = module.params
    model_dir = os.path.join(p["root"], p["model_id"])
    version_name = p["revision"].replace("/", "_")
    target = os.path.join(model_dir, version_name)
    link = os.path.join(model_dir, "current")
    result = {"changed": False, "path": target, "current": link, "revision": p["revision"]}

    commit = branch_commit(p["endpoint"], p["model_id"], p["revision"])
    listing = fetch_listing(module, p, target, result)
    if listing is None:
        return result
    if not listing:
        module.fail_json(
            msg=f"model {p['model_id']}@{p['revision']} at {p['endpoint']} lists no files"
        )
    commit = confirmed(module, p, commit)
    if commit:
        result["commit_id"] = commit
    result["files"] = len(listing)
    result["bytes"] = sum(f["size"] for f in listing.values())

    if module.check_mode:
        sync_version(module, model_dir, version_name, listing, p, commit, result)
        return result
    os.makedirs(model_dir, exist_ok=True)
    with model_lock(module, model_dir, p) as waited:
        result.update(waited_for_lock=waited, collected=[], pruned=[], freed_bytes=0)
        previous = version_named(model_dir, "current") if os.path.islink(link) else None
        protected = {version_named(model_dir, entry): "protect" for entry in p["protect"]}
        protected[previous] = "current before this run"
        protected[version_name] = "this run's"
        protected.pop(None, None)
        collect(model_dir, leftovers(model_dir, keep_staging=version_name), result)

        sync_version(module, model_dir, version_name, listing, p, commit, result)
        # Left over from a run that was interrupted after its download.
        collect(model_dir, leftovers(model_dir, keep_staging=None), result)
        old_history = read_history(model_dir)
        history = made_current(made_current(old_history, previous), version_name)
        prune(module, model_dir, p["keep_versions"], protected, history, result)
        on_disk = set(published_versions(model_dir))
        history = [e for e in history if e["version"] in on_disk]
        if history != old_history:
            write_json(os.path.join(model_dir, HISTORY_FILE), {"made_current": history})
        if result["collected"] or result["pruned"]:
            result["changed"] = True
    return result


def read_listing_from_manifest(directory):
    manifest = read_manifest(directory) or {}
    return {
        k: {"size": v["size"], "sha256": v["sha256"]} for k, v in manifest.get("files", {}).items()
    }


def write_manifest_if_stale(directory, listing, p, commit):
    manifest = read_manifest(directory)
    if not manifest or quick_check(directory, listing):
        write_manifest(directory, listing, p, commit)


def main():
    module = AnsibleModule(
        argument_spec={
            "model_id": {"type": "str", "required": True},
            "revision": {"type": "str", "default": "master"},
            "endpoint": {"type": "str", "required": True},
            "root": {"type": "path", "required": True},
            "verify": {"type": "str", "default": "quick", "choices": ["quick", "deep"]},
            "max_workers": {"type": "int", "default": 4},
            "keep_versions": {"type": "int", "default": 2},
            "protect": {"type": "list", "elements": "str", "default": []},
            "lock_timeout": {"type": "int", "default": 3600},
            "space_margin": {"type": "float", "default": 0.05},
        },
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()

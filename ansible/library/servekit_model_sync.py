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
    {type: int, default: 2, description: Versions kept on disk, the current one included.}
  space_margin:
    type: float
    default: 0.05
    description: Extra free space required, as a share of the model size.
author: servekit
"""

import hashlib
import json
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request

from ansible.module_utils.basic import AnsibleModule

MANIFEST = ".servekit-manifest.json"


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


def write_manifest(directory, listing, p):
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
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def switch_current(model_dir, version_name):
    link = os.path.join(model_dir, "current")
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(version_name, tmp)
    os.replace(tmp, link)


def prune(model_dir, keep, current_name):
    versions = []
    for name in os.listdir(model_dir):
        full = os.path.join(model_dir, name)
        if name.startswith(".") or name == "current" or not os.path.isdir(full):
            continue
        if os.path.islink(full):
            continue
        versions.append((os.path.getmtime(full), name))
    removed = []
    for _, name in sorted(versions, reverse=True)[keep:]:
        if name != current_name:
            shutil.rmtree(os.path.join(model_dir, name))
            removed.append(name)
    return removed


def run(module):
    p = module.params
    model_dir = os.path.join(p["root"], p["model_id"])
    version_name = p["revision"].replace("/", "_")
    target = os.path.join(model_dir, version_name)
    staging = os.path.join(model_dir, ".staging", version_name)
    link = os.path.join(model_dir, "current")
    link_ok = os.path.islink(link) and os.readlink(link) == version_name
    result = {"changed": False, "path": target, "current": link, "revision": p["revision"]}

    try:
        listing = list_files(p["endpoint"], p["model_id"], p["revision"])
    except Exception as exc:  # network, HTTP and JSON errors alike
        if os.path.isdir(target) and not quick_check(target, read_listing_from_manifest(target)):
            module.warn(
                f"cannot list {p['model_id']} at {p['endpoint']} ({exc}); "
                "keeping the verified local copy"
            )
            result["files"] = len(read_listing_from_manifest(target))
            return result
        module.fail_json(
            msg=f"cannot list model {p['model_id']}@{p['revision']} at {p['endpoint']}: {exc}"
        )
    if not listing:
        module.fail_json(
            msg=f"model {p['model_id']}@{p['revision']} at {p['endpoint']} lists no files"
        )
    result["files"] = len(listing)
    result["bytes"] = sum(f["size"] for f in listing.values())

    if os.path.isdir(target):
        bad = deep_check(target, listing) if p["verify"] == "deep" else quick_check(target, listing)
        if not bad:
            if p["verify"] == "deep":
                write_manifest_if_stale(target, listing, p)
            if not link_ok:
                result["changed"] = True
                if not module.check_mode:
                    switch_current(model_dir, version_name)
            return result
        result["reverify"] = bad[:20]
        if p["verify"] == "quick" and bad != ["(no manifest)"]:
            # Size or mtime moved since verification: find out with a full hash.
            bad = deep_check(target, listing)
            if not bad:
                if not module.check_mode:
                    write_manifest(target, listing, p)
                result["changed"] = True
                return result
        result["refetch"] = bad[:20]

    result["changed"] = True
    if module.check_mode:
        return result

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
    write_manifest(staging, listing, p)
    top_level = {name.split("/")[0] for name in listing}
    for leftover in os.listdir(staging):
        if leftover not in top_level and leftover != MANIFEST:
            full = os.path.join(staging, leftover)
            shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)
    if os.path.isdir(target):
        aside = os.path.join(model_dir, f".replaced-{version_name}-{int(time.time())}")
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside)
        result["replaced"] = True
    else:
        os.rename(staging, target)
    switch_current(model_dir, version_name)
    result["pruned"] = prune(model_dir, p["keep_versions"], version_name)
    return result


def read_listing_from_manifest(directory):
    manifest = read_manifest(directory) or {}
    return {
        k: {"size": v["size"], "sha256": v["sha256"]} for k, v in manifest.get("files", {}).items()
    }


def write_manifest_if_stale(directory, listing, p):
    manifest = read_manifest(directory)
    if not manifest or quick_check(directory, listing):
        write_manifest(directory, listing, p)


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
            "space_margin": {"type": "float", "default": 0.05},
        },
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()

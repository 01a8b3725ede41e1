"""Work done directly on sandbox hosts: the floors of the converge phases and vLLM started by hand.

A floor is the same work done by hand with the plainest tools, without Ansible: the packages
installed with ``apt-get``, the image's layers fetched with ``curl`` and unpacked with ``tar``, the
SDK installed with ``pip``, the model's files fetched with ``curl``, the server container started
with ``docker run``. The converge phase divided by its floor is what the automation costs.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import requests

from servekit.images.registry import MANIFEST_TYPES as REGISTRY_MANIFEST_TYPES

#: Container name of vLLM started by hand (the unit's container is ``vllm``).
HAND_CONTAINER = "servekit-bench-vllm"
#: Throw-away container the floors of a fresh host run in.
FLOOR_CONTAINER = "servekit-bench-floor"
FLOOR_MARK = "FLOOR"
MANIFEST_TYPES = ", ".join(REGISTRY_MANIFEST_TYPES)
#: Docker's default number of layers fetched at once (max-concurrent-downloads).
PULL_CONCURRENCY = 3


def docker_exec(
    container: str, *args: str, timeout: float | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "exec", container, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def must(proc: subprocess.CompletedProcess, what: str) -> str:
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


def poll(check: Callable[[], bool], what: str, timeout: float, interval: float = 0.1) -> float:
    """Seconds until ``check()`` is true (RuntimeError after ``timeout``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - start


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


# --- vLLM by hand ----------------------------------------------------------------------------


def exec_start_argv(unit_text: str) -> list[str]:
    """The ``ExecStart=`` command of a systemd unit as an argv (continuation lines joined,
    comments dropped)."""
    joined: list[str] = []
    buf = ""
    for line in unit_text.splitlines():
        stripped = line.rstrip()
        if stripped.lstrip().startswith(("#", ";")):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        joined.append(buf + stripped)
        buf = ""
    if buf:
        joined.append(buf)
    command = ""
    for line in joined:  # `systemctl cat` shows drop-ins after the unit: the last one wins
        text = line.strip()
        if text.startswith("ExecStart="):
            command = text[len("ExecStart=") :].lstrip("-@+!:").strip()
    if not command:
        raise ValueError("the unit has no ExecStart=")
    return shlex.split(command)


def compile_cache_dir(unit_argv: Sequence[str]) -> str | None:
    """The host directory the unit's ``docker run`` gives vLLM as its cache root (``--env
    VLLM_CACHE_ROOT=R`` and ``--volume DIR:R``), or None when the cache is not kept."""
    envs, volumes = [], []
    for flag, value in zip(unit_argv, [*unit_argv[1:], ""], strict=True):
        if flag in ("-e", "--env"):
            envs.append(value)
        elif flag in ("-v", "--volume"):
            volumes.append(value)
    roots = [e.split("=", 1)[1] for e in envs if e.startswith("VLLM_CACHE_ROOT=")]
    if not roots:
        return None
    for volume in volumes:
        source, _, rest = volume.partition(":")
        if rest.split(":", 1)[0] == roots[-1]:
            return source
    return None


def hand_start_argv(unit_argv: Sequence[str], name: str = HAND_CONTAINER) -> list[str]:
    """The unit's ``docker run`` with the same image, flags and model, detached, under ``name``."""
    argv = list(unit_argv)
    if len(argv) < 2 or not argv[0].endswith("docker") or argv[1] != "run":
        raise ValueError(f"expected the unit to start `docker run ...`, got {argv[:3]}")
    if "--name" in argv:
        argv[argv.index("--name") + 1] = name
    else:
        argv[2:2] = ["--name", name]
    if "-d" not in argv and "--detach" not in argv:
        argv.insert(2, "--detach")
    return argv


# --- floors of a fresh host ------------------------------------------------------------------


def split_image_ref(ref: str) -> tuple[str, str, str]:
    """``registry/repo@sha256:..`` -> (registry, repo, digest)."""
    name, at, digest = ref.partition("@")
    if not at or "/" not in name:
        raise ValueError(f"expected registry/repository@digest, got {ref!r}")
    registry, repo = name.split("/", 1)
    if ":" in repo.rsplit("/", 1)[-1]:  # a tag before the digest
        repo = repo.rsplit(":", 1)[0]
    return registry, repo, digest


def _decompressor(media_type: str) -> str:
    if media_type.endswith(("gzip", ".tar.gzip")) or "+gzip" in media_type:
        return "gzip -dc"
    if "zstd" in media_type:
        return "zstd -dc"
    if media_type.endswith((".tar", "diff.tar", ".rootfs.diff.tar")) or media_type.endswith("tar"):
        return "cat"
    raise ValueError(f"unknown layer media type {media_type!r}")


def layers(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The layers of an image manifest: digest, size and the command that decompresses them."""
    if "manifests" in manifest:
        raise ValueError("an index, not an image manifest: pick a platform first")
    return [
        {
            "digest": layer["digest"],
            "size": int(layer.get("size") or 0),
            "decompress": _decompressor(layer.get("mediaType", "")),
        }
        for layer in manifest.get("layers") or []
    ]


def pick_platform(index: Mapping[str, Any], arch: str = "amd64") -> str:
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") or {}
        if plat.get("os", "linux") == "linux" and plat.get("architecture") == arch:
            return entry["digest"]
    raise ValueError(f"no linux/{arch} image in the index")


def fetch_layers(registry_url: str, repo: str, digest: str) -> list[dict[str, Any]]:
    """The layers of ``repo@digest`` as the registry at ``registry_url`` serves them."""

    def get(ref: str) -> dict[str, Any]:
        resp = requests.get(
            f"{registry_url}/v2/{repo}/manifests/{ref}",
            headers={"Accept": MANIFEST_TYPES},
            timeout=30,
        )
        resp.raise_for_status()
        return resp.json()

    manifest = get(digest)
    if "manifests" in manifest:
        manifest = get(pick_platform(manifest))
    return layers(manifest)


def model_file_urls(endpoint: str, model_id: str, paths: Sequence[str], revision: str) -> list:
    """Download URLs of a model's files on a ModelScope endpoint (or a servekit mirror)."""
    return [
        f"{endpoint}/api/v1/models/{model_id}/repo?"
        + urllib.parse.urlencode({"Revision": revision, "FilePath": p})
        for p in paths
    ]


def list_model_files(endpoint: str, model_id: str, revision: str = "master") -> list[str]:
    resp = requests.get(
        f"{endpoint}/api/v1/models/{model_id}/repo/files",
        params={"Revision": revision, "Recursive": "true"},
        timeout=60,
    )
    resp.raise_for_status()
    files = resp.json()["Data"]["Files"]
    return [f["Path"] for f in files if f.get("Type") == "blob"]


#: Shell functions of the floor script (bash): timing marks, a bounded parallel runner, file
#: fetches and layer unpacking. Everything lands under $FLOOR.
SCRIPT_FUNCTIONS = r"""set -eu -o pipefail
: "${FLOOR:=/floor}"
now() { date +%s%N; }
mark() {
  local d=$(( $(now) - $2 ))
  printf 'FLOOR %s %d.%03d\n' "$1" $((d / 1000000000)) $(((d / 1000000) % 1000))
}
# "parallel N FUNCTION": FUNCTION LINE for each line of stdin, N at a time (xargs -P); fails
# when any of them failed.
parallel() { xargs -r -d '\n' -n 1 -P "$1" bash -c "$2"' "$1"' _; }
fetch_file() {
  set -eu -o pipefail
  [ -n "$1" ] || return 0
  mkdir -p "$FLOOR/model"
  curl -sSf -o "$FLOOR/model/$(printf '%s' "$1" | md5sum | cut -c1-16)" "$1"
}
# "URL DECOMPRESS..." -> the layer unpacked into its own directory.
unpack_layer() {
  set -eu -o pipefail
  [ -n "$1" ] || return 0
  local url=${1%% *} cmd=${1#* } dir
  mkdir -p "$FLOOR/image"
  dir=$(mktemp -d -p "$FLOOR/image")
  curl -sSf "$url" | $cmd | tar -x -C "$dir"
}
export FLOOR
export -f fetch_file unpack_layer
"""

#: Set-up of the throw-away container: package scripts may not start services there (the
#: floor is the install alone; a service start is about a second with systemd).
SCRIPT_SETUP = r"""export DEBIAN_FRONTEND=noninteractive
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
"""


def floor_script(
    *,
    docker_packages: Sequence[str],
    model_packages: Sequence[str],
    sdk_lock: str,
    model_urls: Sequence[str],
    layer_urls: Sequence[tuple[str, str]],
    ca_bundle: str | None = None,
    pip_index_url: str | None = None,
    model_workers: int = 4,
) -> str:
    """A bash script that does a fresh host's converge work by hand, step by step, and prints
    ``FLOOR <step> <seconds>`` after each: ``docker_engine`` (apt-get update and the Docker
    packages), ``model_packages`` (the model role's OS packages), ``model_sdk`` (a venv and the
    SDK from the package index, installed from ``sdk_lock``, the role's hashed lock, as the
    role does: ``--require-hashes --only-binary=:all:``, no pip cache), ``model_files`` (the
    model's files with curl, ``model_workers`` at a time) and ``image`` (every layer fetched and
    unpacked, ``PULL_CONCURRENCY`` at a time). ``layer_urls`` are (blob URL, decompress command)
    pairs."""
    q = shlex.quote
    pip_env = []
    if ca_bundle:
        pip_env += [f"PIP_CERT={q(ca_bundle)}", f"REQUESTS_CA_BUNDLE={q(ca_bundle)}"]
        pip_env += [f"SSL_CERT_FILE={q(ca_bundle)}"]
    if pip_index_url:
        pip_env.append(f"PIP_INDEX_URL={q(pip_index_url)}")
    env = " ".join(pip_env)
    lines = [
        SCRIPT_FUNCTIONS,
        SCRIPT_SETUP,
        "t=$(now)",
        "apt-get -q update >/dev/null",
        f"apt-get -q install -y {' '.join(q(p) for p in docker_packages)} >/dev/null",
        "mark docker_engine $t",
        "t=$(now)",
        f"apt-get -q install -y {' '.join(q(p) for p in model_packages)} >/dev/null",
        "mark model_packages $t",
        "t=$(now)",
        'python3 -m venv "$FLOOR/venv"',
        f'printf %s {q(sdk_lock)} > "$FLOOR/sdk.lock.txt"',
        f'{env} "$FLOOR/venv/bin/pip" install -q --no-cache-dir --require-hashes '
        '--only-binary=:all: -r "$FLOOR/sdk.lock.txt"'.strip(),
        "mark model_sdk $t",
        "t=$(now)",
        f"printf '%s\\n' {' '.join(q(u) for u in model_urls)}"
        f" | parallel {model_workers} fetch_file",
        "mark model_files $t",
        "t=$(now)",
        "printf '%s\\n' "
        + " ".join(q(f"{url} {cmd}") for url, cmd in layer_urls)
        + f" | parallel {PULL_CONCURRENCY} unpack_layer",
        "mark image $t",
    ]
    return "\n".join(lines) + "\n"


def parse_floors(output: str) -> dict[str, float]:
    """``{step: seconds}`` from the ``FLOOR`` lines of :func:`floor_script`."""
    out: dict[str, float] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == FLOOR_MARK:
            try:
                out[parts[1]] = round(float(parts[2]), 3)
            except ValueError:
                continue
    return out


def run_floor_container(
    image: str, script: str, *, add_hosts: Mapping[str, str], mounts: Sequence[str] = ()
) -> tuple[dict[str, float], str | None]:
    """Run ``script`` in a throw-away container of the fresh-host image: the FLOOR times it
    printed, and what went wrong when it failed part-way (None when it did not)."""
    subprocess.run(["docker", "rm", "-f", FLOOR_CONTAINER], capture_output=True, check=False)
    cmd = ["docker", "run", "--rm", "--name", FLOOR_CONTAINER]
    for name, address in add_hosts.items():
        cmd += ["--add-host", f"{name}:{address}"]
    for mount in mounts:
        cmd += ["--volume", mount]
    cmd += [image, "bash", "-c", script]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    finally:
        subprocess.run(["docker", "rm", "-f", FLOOR_CONTAINER], capture_output=True, check=False)
    floors = parse_floors(proc.stdout)
    if proc.returncode == 0:
        return floors, None
    return floors, (
        f"the floor script failed (exit {proc.returncode}) after {sorted(floors) or 'no step'}: "
        f"{proc.stderr.strip()[-1500:]}"
    )


PREFLIGHT_FLOOR = (
    ". /etc/os-release && echo $ID-$VERSION_ID && df --output=target,avail -B1 /opt "
    "&& cat /sys/bus/pci/devices/*/vendor | grep -c 0x10de || true"
)

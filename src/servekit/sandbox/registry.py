"""The sandbox's image registry and the vLLM image in it, locked as a site locks its images.

The registry container ``servekit-registry`` listens on 127.0.0.1:5000 for this machine and on
the bridge gateway's port 5000 for the sandbox hosts, which call it ``servekit-control:5000``.
Its storage is a volume kept by ``down()`` (a cache of the pushed image) unless purged.
"""

from __future__ import annotations

from pathlib import Path

from ..checkout import repo_root
from ..images import lock as image_lock
from ..images import vllm_version
from ..images.registry import RegistryError, resolve_digest
from ..images.tags import aliased
from .common import Progress, SandboxError, http_get, wait_until
from .containers import (
    ensure_volume,
    get_container,
    remove_container,
    remove_volume,
    sandbox_containers,
)
from .state import CONTROL_HOSTNAME, ROLE_LABEL, ROLE_REGISTRY, VOLUME_LABEL

REGISTRY_CONTAINER = "servekit-registry"
REGISTRY_VOLUME = "servekit-registry-data"
REGISTRY_PORT = 5000
LOCAL_REGISTRY = f"127.0.0.1:{REGISTRY_PORT}"
#: The registry as the sandbox hosts name it.
REMOTE_REGISTRY = f"{CONTROL_HOSTNAME}:{REGISTRY_PORT}"
VLLM_REPOSITORY = "servekit/vllm-cpu"

#: The sandbox registry as the sandbox hosts name it -> as this machine reaches it.
REGISTRY_ALIASES = {REMOTE_REGISTRY: LOCAL_REGISTRY}
resolve_sandbox_digest = aliased(resolve_digest, REGISTRY_ALIASES)


def vllm_registry_repo(registry: str) -> str:
    return f"{registry}/{VLLM_REPOSITORY}"


def sandbox_vllm_tag() -> str:
    """The release tag of the sandbox's vLLM image, as the vllm_service role names it."""
    return f"v{vllm_version(repo_root())}"


def ready() -> bool:
    """True when the registry answers ``/v2/`` on 127.0.0.1."""
    resp = http_get(f"http://{LOCAL_REGISTRY}/v2/")
    return resp is not None and resp.status_code == 200


def ensure_registry(client, image: str, gateway: str, progress: Progress) -> None:
    """Run the registry from ``image`` (replacing one from another image), until it answers."""
    container = get_container(client, REGISTRY_CONTAINER)
    image_id = client.images.get(image).id
    if container is not None:
        if container.status == "running" and container.image.id == image_id:
            progress("  registry already running")
        else:
            container.remove(force=True)
            container = None
    if container is None:
        ensure_volume(client, REGISTRY_VOLUME)
        try:
            container = client.containers.run(
                image,
                name=REGISTRY_CONTAINER,
                detach=True,
                labels={ROLE_LABEL: ROLE_REGISTRY},
                volumes={REGISTRY_VOLUME: {"bind": "/var/lib/docker-registry", "mode": "rw"}},
                ports={
                    f"{REGISTRY_PORT}/tcp": [
                        ("127.0.0.1", REGISTRY_PORT),
                        (gateway, REGISTRY_PORT),
                    ]
                },
                restart_policy={"Name": "unless-stopped"},
            )
        except Exception as exc:
            raise SandboxError(
                f"cannot start the registry container: {exc} (is port {REGISTRY_PORT} free?)"
            ) from exc

    def running_and_ready():
        container.reload()
        if container.status not in ("running", "created"):
            logs = container.logs(tail=20).decode(errors="replace")
            raise SandboxError(f"the registry container stopped ({container.status}):\n{logs}")
        return ready()

    wait_until(running_and_ready, "the registry's /v2/", timeout=60)


def remove_registries(client, progress: Progress, *, purge: bool) -> None:
    """Remove the registry container(s) and the sandbox's volumes; the registry's storage
    stays unless ``purge``."""
    registries = sandbox_containers(client, ROLE_REGISTRY)
    named = get_container(client, REGISTRY_CONTAINER)
    if named is not None and named.id not in {c.id for c in registries}:
        registries.append(named)
    keep = frozenset() if purge else frozenset({REGISTRY_VOLUME})
    for container in registries:
        remove_container(client, container, progress, keep)
    for volume in client.volumes.list(filters={"label": VOLUME_LABEL}):
        if volume.name != REGISTRY_VOLUME or purge:
            volume.remove(force=True)
    if purge:
        remove_volume(client, REGISTRY_VOLUME)


def registry_digest(registry: str, repo: str, tag: str) -> str | None:
    """The manifest digest the registry has for ``repo:tag``, or None."""
    try:
        return resolve_digest(f"{registry}/{repo}:{tag}", timeout=10)
    except RegistryError:
        return None


def push_vllm_image(client, ref: str, progress: Progress) -> str:
    """Push the vLLM image to the local registry (unless it holds it already); its digest."""
    repo = vllm_registry_repo(LOCAL_REGISTRY)
    tag = ref.rsplit(":", 1)[1]
    image = client.images.get(ref)
    digest = registry_digest(LOCAL_REGISTRY, VLLM_REPOSITORY, tag)
    version_tag = sandbox_vllm_tag()
    if digest and f"{repo}@{digest}" in (image.attrs.get("RepoDigests") or []):
        progress(f"  registry already has {repo}:{tag} ({digest[:19]}…)")
        # The release tag is set when this build is first pushed; a later push by someone
        # else is theirs (the lock decides what deploys), unless the tag is missing.
        if registry_digest(LOCAL_REGISTRY, VLLM_REPOSITORY, version_tag) is None:
            _push_tag(client, image, repo, version_tag, progress)
        return digest
    digest = _push_tag(client, image, repo, tag, progress)
    _push_tag(client, image, repo, version_tag, progress)
    return digest


def _push_tag(client, image, repo: str, tag: str, progress: Progress) -> str:
    """Push ``image`` as ``repo:tag``; the digest the registry then serves (the pushed one)."""
    image.tag(repo, tag)
    progress(f"  pushing {repo}:{tag} (~3 GB; about 1.5 min the first time)…")
    pushed: set[str] = set()
    layers: set[str] = set()
    aux_digest = None
    for chunk in client.api.push(repo, tag=tag, stream=True, decode=True):
        if "error" in chunk:
            raise SandboxError(f"pushing {repo}:{tag} failed: {chunk['error']}")
        layer = chunk.get("id")
        status = chunk.get("status", "")
        if layer and status in ("Preparing", "Waiting"):
            layers.add(layer)
        done = status in ("Pushed", "Layer already exists") or status.startswith("Mounted from")
        if layer and done and layer not in pushed:
            pushed.add(layer)
            progress(f"    layer {layer}: {status.lower()} ({len(pushed)}/{len(layers)})")
        aux = chunk.get("aux")
        if isinstance(aux, dict) and aux.get("Digest"):
            aux_digest = aux["Digest"]
    registry = repo.split("/", 1)[0]
    digest = registry_digest(registry, VLLM_REPOSITORY, tag)
    if not digest:
        raise SandboxError(f"the registry does not list {repo}:{tag} after the push")
    if aux_digest and aux_digest != digest:
        raise SandboxError(f"pushed digest {aux_digest} but the registry serves {digest}")
    return digest


def lock_sandbox_image(directory: Path, progress: Progress) -> None:
    """Lock the sandbox's vLLM release tag beside the inventory in ``directory``, as
    `make lock-images` does on a site, unless it is locked already (a moved tag is reported
    by `make deploy`, never followed silently)."""
    remote = f"{vllm_registry_repo(REMOTE_REGISTRY)}:{sandbox_vllm_tag()}"
    directory.mkdir(parents=True, exist_ok=True)
    path = image_lock.lock_path(directory)
    if remote in image_lock.read_lock(path):
        progress(f"  {path} locks {remote} already")
        return
    statuses = image_lock.lock([remote], path, resolve=resolve_sandbox_digest)
    progress(f"  {path}: {remote} at {statuses[0].current}")

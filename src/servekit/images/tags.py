"""Which image tags an inventory deploys, as the roles build them.

vllm_service runs ``vllm_service_image_repository:vllm_service_image_tag`` (by default
``docker.io/vllm/vllm-openai:v<servekit_vllm_version>``) and, where the inventory has a
`monitoring` group, the monitoring role runs the DCGM exporter's tag on every GPU host that
serves on a GPU; each at the digest the lock holds. A host whose image variable is set in the
inventory is pinned by hand and needs no lock entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..checkout import role_defaults
from ..inventory import _plain, hostvars_of, load_inventory
from . import lock
from .versions import vllm_version


class TagError(ValueError):
    """An inventory value the kit cannot turn into an image tag without Ansible."""


def _value(hv: Mapping[str, Any], name: str, default: str, host: str) -> str:
    if name not in hv:
        return default
    value = _plain(hv[name], hv)
    if value is None:
        raise TagError(
            f"{name} of {host} is a template or vault value ({hv[name]!r}): give it a plain "
            "value in the inventory, or lock that image by hand (docs/security.md)"
        )
    return str(value)


def host_image_tag(host: str, hv: Mapping[str, Any], root: Path) -> str | None:
    """The ``repository:tag`` that ``host`` runs, or None when it is pinned by hand."""
    if "vllm_service_image" in hv:
        return None
    defaults = role_defaults("vllm_service", root=root)
    version = _value(hv, "servekit_vllm_version", vllm_version(root), host)
    repository = _value(
        hv, "vllm_service_image_repository", str(defaults["vllm_service_image_repository"]), host
    )
    tag = _value(hv, "vllm_service_image_tag", f"v{version}", host)
    return f"{repository}:{tag}"


def dcgm_image_tag(host: str, hv: Mapping[str, Any], root: Path) -> str | None:
    """The DCGM exporter's ``repository:tag`` on a monitored GPU host, or None when the host
    serves on the CPU or pins the image by hand."""
    if "monitoring_dcgm_exporter_image" in hv or hv.get("servekit_accelerator") == "cpu":
        return None
    defaults = role_defaults("monitoring", root=root)
    repository = _value(
        hv,
        "monitoring_dcgm_exporter_image_repository",
        str(defaults["monitoring_dcgm_exporter_image_repository"]),
        host,
    )
    tag = _value(
        hv,
        "monitoring_dcgm_exporter_image_tag",
        str(defaults["monitoring_dcgm_exporter_image_tag"]),
        host,
    )
    return f"{repository}:{tag}"


def inventory_image_tags(
    inventory: Path, root: Path, group: str = "gpu_hosts"
) -> dict[str, list[str]]:
    """Every tag the hosts of ``group`` run -> those hosts (hosts pinned by hand left out)."""
    data = load_inventory(inventory)
    monitored = bool(hostvars_of(data, "monitoring"))
    tags: dict[str, list[str]] = {}
    for host, hv in hostvars_of(data, group).items():
        found = [host_image_tag(host, hv, root)]
        if monitored:
            found.append(dcgm_image_tag(host, hv, root))
        for tag in filter(None, found):
            tags.setdefault(tag, []).append(host)
    return tags


def locked_host_image(host: str, hv: Mapping[str, Any], inventory: Path, root: Path) -> str | None:
    """``repository:tag@digest`` that ``host`` deploys: its tag at the digest of the lock
    beside ``inventory``; None when it is pinned by hand. TagError when the lock has no entry."""
    tag = host_image_tag(host, hv, root)
    if tag is None:
        return None
    path = lock.lock_path(inventory)
    digest = lock.read_lock(path).get(tag)
    if not digest:
        raise TagError(
            f"{tag} ({host}) has no digest in {path}: run `make lock-images INVENTORY={inventory}`"
        )
    return f"{tag}@{digest}"


def aliased(resolve: Callable[..., str], aliases: Mapping[str, str]) -> Callable[..., str]:
    """``resolve`` that asks ``aliases[registry]`` for a registry this machine knows by another
    address (the sandbox's `servekit-control:5000` is 127.0.0.1:5000 here); the lock keeps
    the name the hosts use."""

    def resolve_aliased(ref: str, **kwargs: Any) -> str:
        registry, sep, rest = ref.partition("/")
        return resolve(f"{aliases.get(registry, registry)}{sep}{rest}", **kwargs)

    return resolve_aliased

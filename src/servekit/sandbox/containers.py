"""The Docker objects of the sandbox: containers found by name or role, their volumes, their
ports and addresses, and their removal with the volumes they hold."""

from __future__ import annotations

import contextlib

from .common import Progress, SandboxError
from .state import ROLE_LABEL, VOLUME_LABEL


def get_container(client, name: str):
    """The container called ``name``, or None."""
    from docker.errors import NotFound

    try:
        return client.containers.get(name)
    except NotFound:
        return None


def sandbox_containers(client, role: str) -> list:
    """Every container (running or not) labelled with the sandbox role ``role``."""
    return client.containers.list(all=True, filters={"label": f"{ROLE_LABEL}={role}"})


def ensure_volume(client, name: str) -> bool:
    """Create volume ``name`` (labelled as the sandbox's) unless it exists; True if made."""
    if volume_exists(client, name):
        return False
    client.volumes.create(name=name, labels={VOLUME_LABEL: "1"})
    return True


def volume_exists(client, name: str) -> bool:
    from docker.errors import NotFound

    try:
        client.volumes.get(name)
    except NotFound:
        return False
    return True


def remove_volume(client, name: str) -> None:
    from docker.errors import NotFound

    with contextlib.suppress(NotFound):
        client.volumes.get(name).remove(force=True)


def remove_container(client, container, progress: Progress, keep: frozenset = frozenset()) -> None:
    """Stop and remove ``container`` and the volumes it mounts, but those named in ``keep``."""
    volumes = [
        m["Name"]
        for m in container.attrs.get("Mounts", [])
        if m.get("Type") == "volume" and m["Name"] not in keep
    ]
    if container.status == "running":
        with contextlib.suppress(Exception):
            container.stop(timeout=30)
    container.remove(force=True, v=True)
    for name in volumes:
        remove_volume(client, name)
    progress(f"  removed {container.name}" + (f" and {', '.join(volumes)}" if volumes else ""))


def start(container, ssh: int, api: int) -> None:
    """Start a sandbox host's container; a failure names the ports it publishes."""
    try:
        container.start()
    except Exception as exc:
        raise SandboxError(
            f"cannot start {container.name}: {exc} (are ports {ssh} and {api} on 127.0.0.1 free?)"
        ) from exc


def run(container, cmd: list[str]) -> tuple[int, str]:
    """``docker exec``: the exit code and the output."""
    result = container.exec_run(cmd, demux=False)
    return result.exit_code, (result.output or b"").decode(errors="replace").strip()


def published_port(container, port: str = "8000/tcp") -> int | None:
    """The port of this machine that ``port`` of the container is published on."""
    bindings = (container.attrs.get("HostConfig", {}).get("PortBindings") or {}).get(port) or []
    return int(bindings[0]["HostPort"]) if bindings and bindings[0].get("HostPort") else None


def bridge_address(container) -> str:
    """The container's address on Docker's default bridge ("" when it has none)."""
    container.reload()
    settings = container.attrs.get("NetworkSettings", {})
    return settings.get("IPAddress") or (
        (settings.get("Networks") or {}).get("bridge", {}).get("IPAddress") or ""
    )

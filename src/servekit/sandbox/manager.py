"""Bring the local sandbox up and down: "GPU hosts" in containers, a registry, a model mirror.

``up()`` builds what is missing and starts, in order:

* the four images (``servekit.sandbox.images``) and the facts of their vLLM release
  (``servekit.sandbox.vllm_facts``);
* an SSH key pair, ``.sandbox/ssh/id_ed25519``;
* the registry container ``servekit-registry`` (127.0.0.1:5000 for this machine, the bridge
  gateway's port 5000 for the sandbox hosts), holding the vLLM image, whose release tag is
  locked beside the sandbox inventories (``servekit.sandbox.registry``);
* the model mirror (``servekit.sandbox.model_mirror``) serving ``.sandbox/mirror`` on the
  bridge gateway, port 8090, with the generated test model under ``Qwen/Qwen3-8B``;
* sandbox hosts ``servekit-sandbox-1..N`` (``servekit.sandbox.hosts``): Debian 12 with systemd
  and sshd, SSH on 127.0.0.1:2221+N, their port 8000 on 127.0.0.1:7999+N. Inside them the name
  ``servekit-control`` is this machine (the bridge gateway), so an inventory can say
  ``servekit-control:5000`` and ``http://servekit-control:8090``;
* with ``gateway=True`` (fleet mode, ``servekit.sandbox.fleet``), one more such host,
  ``servekit-gateway``, SSH on 127.0.0.1:2221, its port 8000 on 127.0.0.1:8080; the hosts keep
  their ports, and ``.sandbox/inventory/hosts.yml`` lists them all.

Everything it made is recorded in ``.sandbox/state.json`` (``servekit.sandbox.state``);
``down()`` removes it all. Both are idempotent: ``up()`` reuses what already runs.
"""

from __future__ import annotations

import time

from ..checkout import repo_root
from ..images import lock as image_lock
from ..mirror.process import healthy as mirror_healthy
from . import fleet, images, vllm_facts
from .common import Progress, SandboxError, docker_client, fmt_duration, step
from .containers import get_container, published_port, remove_container, sandbox_containers
from .hosts import (
    bridge_gateway,
    ensure_gateway,
    ensure_host,
    ensure_ssh_key,
    remove_extra_hosts,
    remove_gateway,
    write_known_hosts,
)
from .model_mirror import MIRROR_PORT, ensure_mirror, mirror_url, running_pid, stop_mirror
from .registry import (
    LOCAL_REGISTRY,
    REGISTRY_CONTAINER,
    REGISTRY_VOLUME,
    REMOTE_REGISTRY,
    ensure_registry,
    lock_sandbox_image,
    push_vllm_image,
    remove_registries,
    vllm_registry_repo,
)
from .registry import ready as registry_ready
from .state import (
    CONTROL_HOSTNAME,
    INDEX_LABEL,
    ROLE_HOST,
    SandboxPaths,
    SandboxState,
    host_container,
    locked,
    sandbox_inventory_dir,
    ssh_port,
    write_state,
)


def up(hosts: int = 1, *, gateway: bool = False, progress: Progress = print) -> SandboxState:
    """Bring the sandbox up with ``hosts`` sandbox hosts; reuse whatever already runs.

    Sandbox hosts it made earlier that are numbered above ``hosts`` are removed, so the
    sandbox matches the request. ``gateway`` adds the gateway host in front of them (fleet
    mode, see ``servekit.sandbox.fleet``); without it a gateway left from fleet mode goes.
    """
    fleet.check_request(hosts, gateway)
    fleet_mode = gateway  # below, `bridge` is the Docker bridge's gateway address
    paths = SandboxPaths()
    start = time.monotonic()
    with locked(paths):
        with step(progress, "images"):
            refs = images.ensure_images(progress=progress)
        with step(progress, "what the vLLM release accepts"):
            vllm_facts.ensure_recorded(refs["vllm-cpu"], progress=progress)
        client = docker_client()
        bridge = bridge_gateway(client)

        with step(progress, "ssh key"):
            pubkey = ensure_ssh_key(paths)

        with step(progress, f"registry {REGISTRY_CONTAINER} (127.0.0.1 and {bridge}:5000)"):
            ensure_registry(client, refs["registry"], bridge, progress)
        with step(progress, "vllm-cpu image in the registry"):
            digest = push_vllm_image(client, refs["vllm-cpu"], progress)
        vllm_image = f"{vllm_registry_repo(REMOTE_REGISTRY)}@{digest}"
        paths.vllm_image.write_text(vllm_image + "\n")
        lock_dirs = [sandbox_inventory_dir()] + ([paths.fleet_inventory] if fleet_mode else [])
        with step(progress, "image locks of the sandbox inventories"):
            for directory in lock_dirs:
                lock_sandbox_image(directory, progress)

        with step(progress, f"model mirror on {mirror_url(bridge)}"):
            mirror_pid = ensure_mirror(paths, bridge, progress)

        if not fleet_mode:
            remove_gateway(client, progress)
        sandbox_hosts = []
        for n in range(1, hosts + 1):
            with step(progress, f"sandbox host {host_container(n)} (ssh 127.0.0.1:{ssh_port(n)})"):
                sandbox_hosts.append(
                    ensure_host(client, n, refs["sandbox-host"], bridge, pubkey, paths, progress)
                )
        remove_extra_hosts(client, hosts, progress)
        gateway_host = None
        if fleet_mode:
            name = fleet.GATEWAY_CONTAINER
            with step(progress, f"gateway host {name} (ssh 127.0.0.1:{fleet.GATEWAY_SSH_PORT})"):
                gateway_host = ensure_gateway(
                    client, refs["sandbox-host"], bridge, pubkey, paths, progress
                )
            inventory_file = fleet.write_inventory(
                paths.fleet_inventory, sandbox_hosts, gateway_host, repo_root()
            )
            progress(f"  fleet inventory: {inventory_file}")
        else:
            fleet.remove_inventory(paths.fleet_inventory)
        write_known_hosts(client, sandbox_hosts + ([gateway_host] if gateway_host else []), paths)

        state = SandboxState(
            hosts=sandbox_hosts,
            ssh_user="root",
            ssh_key=str(paths.key),
            known_hosts=str(paths.known_hosts),
            gateway=bridge,
            control_hostname=CONTROL_HOSTNAME,
            registry={
                "container": REGISTRY_CONTAINER,
                "volume": REGISTRY_VOLUME,
                "local": LOCAL_REGISTRY,
                "remote": REMOTE_REGISTRY,
            },
            mirror={
                "url": f"http://{CONTROL_HOSTNAME}:{MIRROR_PORT}",
                "local_url": mirror_url(bridge),
                "root": str(paths.mirror_root),
                "model_dir": str(paths.model),
                "pid": mirror_pid,
                "log": str(paths.mirror_log),
            },
            images=refs,
            vllm_image=vllm_image,
            gateway_host=gateway_host,
            inventory=str(paths.fleet_inventory / "hosts.yml") if fleet_mode else None,
        )
        write_state(paths, state)
    progress(
        f"sandbox up in {fmt_duration(time.monotonic() - start)}: {len(sandbox_hosts)} host(s)"
        + (" and a gateway" if fleet_mode else "")
        + f", state in {paths.state}"
    )
    return state


def down(*, purge: bool = False, progress: Progress = print) -> None:
    """Remove every sandbox host, the registry, their volumes, and stop the mirror.

    The registry's storage is a cache of the built vLLM image (like the images themselves)
    and is kept, so the next `up` skips the push; ``purge`` removes it too.
    """
    paths = SandboxPaths()
    start = time.monotonic()
    with locked(paths):
        client = docker_client()
        for container in sandbox_containers(client, ROLE_HOST):
            remove_container(client, container, progress)
        remove_gateway(client, progress)
        fleet.remove_inventory(paths.fleet_inventory)
        remove_registries(client, progress, purge=purge)
        stop_mirror(paths, progress)
        for path in (paths.state, paths.vllm_image, paths.known_hosts):
            path.unlink(missing_ok=True)
        if purge:  # the locked digests were in the registry's storage
            image_lock.lock_path(sandbox_inventory_dir()).unlink(missing_ok=True)
    progress(f"sandbox down ({fmt_duration(time.monotonic() - start)})")


def status() -> dict:
    """What runs now (containers, registry, mirror) and which images are built."""
    paths = SandboxPaths()
    result: dict = {"state_dir": str(paths.root), "docker": False, "hosts": []}
    try:
        client = docker_client(timeout=10)
    except SandboxError as exc:
        result["error"] = str(exc)
        return result
    result["docker"] = True

    def order(container) -> int:
        index = container.labels.get(INDEX_LABEL, "")
        return int(index) if index.isdigit() else 0

    for container in sorted(sandbox_containers(client, ROLE_HOST), key=order):
        index = container.labels.get(INDEX_LABEL, "")
        result["hosts"].append(
            {
                "name": container.name,
                "status": container.status,
                "ssh_port": ssh_port(int(index)) if index.isdigit() else None,
                "api_port": published_port(container),
                "image": (container.image.tags or [container.image.id])[0],
            }
        )
    gateways = sandbox_containers(client, fleet.ROLE_GATEWAY)
    result["gateway"] = (
        {
            "name": gateways[0].name,
            "status": gateways[0].status,
            "ssh_port": published_port(gateways[0], "22/tcp"),
            "api_port": published_port(gateways[0]),
            "inventory": str(paths.fleet_inventory / "hosts.yml"),
        }
        if gateways
        else None
    )
    registry = get_container(client, REGISTRY_CONTAINER)
    result["registry"] = {
        "container": registry.status if registry else None,
        "ready": bool(registry and registry_ready()),
    }
    pid = running_pid(paths)
    url = mirror_url(bridge_gateway(client))
    result["mirror"] = {"pid": pid, "url": url, "healthy": bool(pid and mirror_healthy(url))}
    result["images"] = {
        name: {"ref": ref, "built": images.image_exists(ref, client)}
        for name, ref in images.image_refs().items()
    }
    result["vllm_image"] = (
        paths.vllm_image.read_text().strip() if paths.vllm_image.is_file() else None
    )
    result["up"] = bool(
        result["hosts"]
        and all(h["status"] == "running" for h in result["hosts"])
        and result["registry"]["ready"]
        and result["mirror"]["healthy"]
    )
    return result

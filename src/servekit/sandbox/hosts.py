"""The sandbox hosts: Debian 12 containers with systemd as PID 1 and sshd, reached like servers.

Host ``n`` is ``servekit-sandbox-n``: SSH on 127.0.0.1:2221+n, its port 8000 on 127.0.0.1
(``servekit.sandbox.fleet.api_port``), volumes for its nested Docker and for vLLM's compile
cache (a new host of a fleet starts with host 1's cache). Inside, the name
``servekit-control`` is this machine (the bridge gateway). Fleet mode adds the gateway host
``servekit-gateway``, made the same way without nested Docker. A host counts as up once systemd
runs and SSH answers with the host's own key.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

from . import fleet
from .common import Progress, SandboxError, wait_until
from .containers import (
    bridge_address,
    ensure_volume,
    get_container,
    published_port,
    remove_container,
    run,
    sandbox_containers,
    start,
    volume_exists,
)
from .state import (
    COMPILE_CACHE_DIR,
    CONTROL_HOSTNAME,
    INDEX_LABEL,
    ROLE_HOST,
    ROLE_LABEL,
    SandboxHost,
    SandboxPaths,
    cache_volume,
    host_container,
    host_hostname,
    host_volume,
    ssh_port,
)

#: Seconds for systemd in a new host container to reach "running".
SYSTEMD_TIMEOUT_S = 120


def bridge_gateway(client) -> str:
    """The default bridge's gateway address (usually 172.17.0.1): this machine, as seen
    from containers."""
    net = client.networks.get("bridge")
    for cfg in net.attrs.get("IPAM", {}).get("Config") or []:
        if cfg.get("Gateway"):
            return cfg["Gateway"].split("/")[0]
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True
    ).stdout.split()
    if "inet" in out:
        return out[out.index("inet") + 1].split("/")[0]
    raise SandboxError("cannot find the address of Docker's default bridge (docker0)")


def ensure_ssh_key(paths: SandboxPaths) -> str:
    """The sandbox's SSH key pair (made once); the public key."""
    paths.ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.ssh_dir, 0o700)
    if not paths.key.is_file():
        cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "servekit-sandbox"]
        subprocess.run([*cmd, "-f", str(paths.key)], check=True)
    os.chmod(paths.key, 0o600)
    return Path(f"{paths.key}.pub").read_text().strip()


def authorized_keys_tar(pubkey: str) -> bytes:
    """A tar of ``.ssh/authorized_keys`` holding ``pubkey``, for root's home in a host."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ssh_dir = tarfile.TarInfo(".ssh")
        ssh_dir.type = tarfile.DIRTYPE
        ssh_dir.mode = 0o700
        tar.addfile(ssh_dir)
        data = (pubkey.strip() + "\n").encode()
        keys = tarfile.TarInfo(".ssh/authorized_keys")
        keys.mode = 0o600
        keys.size = len(data)
        tar.addfile(keys, io.BytesIO(data))
    return buf.getvalue()


def _systemd_host_kwargs(
    name: str,
    hostname: str,
    labels: dict,
    ssh: int,
    api: int,
    gateway: str,
    disks: dict[str, str] | None = None,
) -> dict:
    """Container settings of a sandbox host: systemd as PID 1, SSH and port 8000 published
    on 127.0.0.1, ``disks`` (volume -> path) for what outlives the container."""
    volumes = {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}}
    for volume, path in (disks or {}).items():
        volumes[volume] = {"bind": path, "mode": "rw"}
    return {
        "name": name,
        "hostname": hostname,
        "labels": labels,
        "cap_add": ["SYS_ADMIN", "NET_ADMIN"],
        "security_opt": ["seccomp=unconfined"],
        "cgroupns": "host",
        "volumes": volumes,
        "tmpfs": {"/run": "rw,nosuid,nodev,exec,mode=755", "/run/lock": "rw,nosuid,nodev,noexec"},
        "stop_signal": "SIGRTMIN+3",
        # A real server's /dev/shm is half its RAM; vLLM shares it with --ipc=host.
        "shm_size": "2g",
        "extra_hosts": {CONTROL_HOSTNAME: gateway},
        "ports": {"22/tcp": ("127.0.0.1", ssh), "8000/tcp": ("127.0.0.1", api)},
        "restart_policy": {"Name": "unless-stopped"},
    }


def host_run_kwargs(n: int, gateway: str) -> dict:
    """The container settings of sandbox host ``n`` (systemd as PID 1, nested Docker)."""
    return _systemd_host_kwargs(
        host_container(n),
        host_hostname(n),
        {ROLE_LABEL: ROLE_HOST, INDEX_LABEL: str(n)},
        ssh_port(n),
        fleet.api_port(n),
        gateway,
        host_disks(n),
    )


def host_disks(n: int) -> dict[str, str]:
    """Host ``n``'s volumes: its nested Docker's images and vLLM's compile cache."""
    return {host_volume(n): "/var/lib/docker", cache_volume(n): COMPILE_CACHE_DIR}


def seed_compile_cache(client, n: int, image: str, progress: Progress) -> None:
    """Fill new host ``n``'s compile cache with host 1's, as a site warms a new server's cache
    from one that runs the same release: a fleet made after the single host then starts its
    servers without compiling again (vLLM keys each entry by the release and the flags that
    shape the graph, so a different release or flag still compiles)."""
    source = cache_volume(1)
    if n == 1 or not volume_exists(client, source):
        return
    client.containers.run(
        image,
        entrypoint=["cp", "-a", "/from/.", "/to/"],
        volumes={
            source: {"bind": "/from", "mode": "ro"},
            cache_volume(n): {"bind": "/to", "mode": "rw"},
        },
        remove=True,
    )
    progress(f"  {host_container(n)}: compile cache copied from {host_container(1)}")


def gateway_run_kwargs(gateway: str) -> dict:
    """The gateway host: a sandbox host without nested Docker, its endpoint on 127.0.0.1:8080."""
    return _systemd_host_kwargs(
        fleet.GATEWAY_CONTAINER,
        fleet.GATEWAY_HOSTNAME,
        {ROLE_LABEL: fleet.ROLE_GATEWAY},
        fleet.GATEWAY_SSH_PORT,
        fleet.GATEWAY_API_PORT,
        gateway,
    )


def ensure_host(
    client,
    n: int,
    image: str,
    gateway: str,
    pubkey: str,
    paths: SandboxPaths,
    progress: Progress,
) -> SandboxHost:
    """Sandbox host ``n``, running and reachable over SSH (made, or started, if needed)."""
    name = host_container(n)
    ssh, api = ssh_port(n), fleet.api_port(n)
    container = get_container(client, name)
    if container is not None and container.image.id != client.images.get(image).id:
        progress(f"  {name} runs an older sandbox-host image; `down` and `up` to recreate it")
    published = published_port(container) if container is not None else None
    if container is not None and published not in (None, api):
        # A host made by an older servekit, whose fleet mode moved the API port: recreate the
        # container (its volumes, with the pulled vLLM image and the compile cache, stay); a
        # deploy re-converges it.
        progress(f"  {name} publishes its API on {published}, not {api}: recreating it")
        remove_container(client, container, progress, frozenset(host_disks(n)))
        container = None
    if container is None:
        ensure_volume(client, host_volume(n))
        if ensure_volume(client, cache_volume(n)):
            seed_compile_cache(client, n, image, progress)
        container = client.containers.create(image, **host_run_kwargs(n, gateway))
        container.put_archive("/root", authorized_keys_tar(pubkey))
        start(container, ssh, api)
    else:
        container.put_archive("/root", authorized_keys_tar(pubkey))
        if container.status != "running":
            progress(f"  starting the existing {name} ({container.status})")
            start(container, ssh, api)
        else:
            progress(f"  {name} already running")
    _wait_for_systemd(container, progress)
    _wait_for_ssh(client, container, ssh, paths)
    return SandboxHost(
        index=n,
        name=name,
        hostname=host_hostname(n),
        container_id=container.id,
        ssh_host="127.0.0.1",
        ssh_port=ssh,
        api_port=api,
        docker_volume=host_volume(n),
        address=bridge_address(container),
    )


def ensure_gateway(
    client, image: str, gateway: str, pubkey: str, paths: SandboxPaths, progress: Progress
) -> SandboxHost:
    """The gateway host of fleet mode (the gateway role installs HAProxy on it)."""
    name = fleet.GATEWAY_CONTAINER
    ssh, api = fleet.GATEWAY_SSH_PORT, fleet.GATEWAY_API_PORT
    container = get_container(client, name)
    if container is None:
        container = client.containers.create(image, **gateway_run_kwargs(gateway))
    container.put_archive("/root", authorized_keys_tar(pubkey))
    if container.status != "running":
        start(container, ssh, api)
    _wait_for_systemd(container, progress)
    _wait_for_ssh(client, container, ssh, paths)
    return SandboxHost(
        index=0,
        name=name,
        hostname=fleet.GATEWAY_HOSTNAME,
        container_id=container.id,
        ssh_host="127.0.0.1",
        ssh_port=ssh,
        api_port=api,
        docker_volume="",
        address=bridge_address(container),
    )


def remove_gateway(client, progress: Progress) -> None:
    """Remove a gateway host left from fleet mode."""
    for container in sandbox_containers(client, fleet.ROLE_GATEWAY):
        remove_container(client, container, progress)


def remove_extra_hosts(client, keep: int, progress: Progress) -> None:
    """Remove sandbox hosts numbered above ``keep``. Only containers ``up()`` made (named
    servekit-sandbox-N with a matching index label) count: other containers run from the
    sandbox-host image carry its role label too, and are left alone here."""
    for container in sandbox_containers(client, ROLE_HOST):
        index = container.labels.get(INDEX_LABEL, "")
        if not index.isdigit() or container.name != host_container(int(index)):
            continue
        if int(index) > keep:
            remove_container(client, container, progress)


def _wait_for_systemd(container, progress: Progress) -> None:
    seen: dict[str, str] = {}

    def ready():
        container.reload()
        if container.status != "running":
            logs = container.logs(tail=30).decode(errors="replace")
            raise SandboxError(f"{container.name} stopped ({container.status}):\n{logs}")
        _, out = run(container, ["systemctl", "is-system-running"])
        seen["state"] = out
        return out in ("running", "degraded")

    wait_until(
        ready, f"systemd in {container.name} (last state: {seen.get('state')})", SYSTEMD_TIMEOUT_S
    )
    if seen["state"] == "degraded":
        _, failed = run(container, ["systemctl", "--failed", "--no-legend", "--plain"])
        progress(f"  systemd is degraded in {container.name}; failed units:\n{failed}")


def _host_keys(container) -> list[str]:
    _, out = run(container, ["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"])
    return [line for line in out.splitlines() if line.startswith(("ssh-", "ecdsa-"))]


def write_known_hosts(client, hosts: list[SandboxHost], paths: SandboxPaths) -> None:
    """known_hosts for the sandbox hosts, read from their files (not over the network)."""
    lines = []
    for host in hosts:
        container = client.containers.get(host.name)
        for key in _host_keys(container):
            kind, blob = key.split()[:2]
            lines.append(f"[{host.ssh_host}]:{host.ssh_port} {kind} {blob}")
    paths.known_hosts.write_text("".join(f"{line}\n" for line in lines))


def ssh_command(port: int, key: Path, known_hosts: Path | None = None) -> list[str]:
    """``ssh`` to root on a sandbox host (append the remote command)."""
    checking = (
        ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
        if known_hosts
        else ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    )
    return [
        "ssh",
        "-i",
        str(key),
        "-p",
        str(port),
        *checking,
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "LogLevel=ERROR",
        "root@127.0.0.1",
    ]


def _wait_for_ssh(client, container, port: int, paths: SandboxPaths) -> None:
    # The host's own keys go in a known_hosts file, so the check verifies the server too.
    write_known_hosts(
        client,
        [SandboxHost(0, container.name, "", container.id, "127.0.0.1", port, 0, "")],
        paths,
    )
    last: dict[str, str] = {}

    def ready():
        proc = subprocess.run(
            [*ssh_command(port, paths.key, paths.known_hosts), "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        last["err"] = proc.stderr.strip()
        return proc.returncode == 0

    try:
        wait_until(ready, f"ssh to {container.name} on 127.0.0.1:{port}", timeout=60)
    except SandboxError as exc:
        raise SandboxError(f"{exc}; last error: {last.get('err')}") from None

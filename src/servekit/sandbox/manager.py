"""Bring the local sandbox up and down: "GPU hosts" in containers, a registry, a model mirror.

``up()`` builds what is missing and starts, in order:

* the four images (``servekit.sandbox.images``);
* an SSH key pair, ``.sandbox/ssh/id_ed25519``;
* the registry container ``servekit-registry`` (127.0.0.1:5000 for this machine, the
  bridge gateway's port 5000 for the sandbox hosts), holding the vLLM image;
* the model mirror (``servekit.mirror``) serving ``.sandbox/mirror`` on the bridge gateway,
  port 8090, with the generated test model under ``Qwen/Qwen3-8B``;
* sandbox hosts ``servekit-sandbox-1..N``: Debian 12 with systemd and sshd, SSH on
  127.0.0.1:2221+N, their port 8000 on 127.0.0.1:7999+N. Inside them the name
  ``servekit-control`` is this machine (the bridge gateway), so an inventory can say
  ``servekit-control:5000`` and ``http://servekit-control:8090``;
* with ``gateway=True`` (fleet mode, ``servekit.sandbox.fleet``), one more such host,
  ``servekit-gateway``, SSH on 127.0.0.1:2221, its port 8000 on 127.0.0.1:8000; the hosts'
  ports 8000 then move to 127.0.0.1:8000+N, and ``.sandbox/inventory/hosts.yml`` lists them all.

Everything it made is recorded in ``.sandbox/state.json``; ``down()`` removes it all.
Both are idempotent: ``up()`` reuses what already runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..images import lock as image_lock
from ..images import vllm_version
from ..images.registry import RegistryError, resolve_digest
from ..images.tags import aliased
from . import fleet, images, vllm_facts
from .common import (
    Progress,
    SandboxError,
    docker_client,
    fmt_duration,
    repo_root,
    state_dir,
    step,
)

ROLE_LABEL = "servekit.role"
ROLE_HOST = "sandbox-host"
ROLE_REGISTRY = "registry"
#: Label on every volume the sandbox creates, so ``down()`` finds them all.
VOLUME_LABEL = "servekit.sandbox"

CONTROL_HOSTNAME = "servekit-control"
REGISTRY_CONTAINER = "servekit-registry"
REGISTRY_VOLUME = "servekit-registry-data"
REGISTRY_PORT = 5000
MIRROR_PORT = 8090
SSH_PORT_BASE = 2221
API_PORT_BASE = 7999

READY_TIMEOUT_S = 120

# Popen objects of mirrors started by this process (so they can be reaped when stopped).
_CHILDREN: dict[int, subprocess.Popen] = {}


# --- naming --------------------------------------------------------------------------------


def host_container(n: int) -> str:
    return f"servekit-sandbox-{n}"


def host_hostname(n: int) -> str:
    return f"sandbox-{n}"


def host_volume(n: int) -> str:
    return f"servekit-sandbox-{n}-docker"


def ssh_port(n: int) -> int:
    """Host 1 -> 2222, host 2 -> 2223, ..."""
    return SSH_PORT_BASE + n


def api_port(n: int, fleet_mode: bool = False) -> int:
    """Host 1 -> 8000, host 2 -> 8001, ...; in fleet mode (the gateway holds 8000) one up."""
    return fleet.api_port(n, fleet_mode)


def vllm_registry_repo(registry: str) -> str:
    return f"{registry}/servekit/vllm-cpu"


# --- state ---------------------------------------------------------------------------------


@dataclass
class SandboxHost:
    index: int
    name: str
    hostname: str
    container_id: str
    ssh_host: str
    ssh_port: int
    api_port: int
    docker_volume: str
    # The container's address on Docker's default bridge (where the gateway reaches it).
    address: str = ""


@dataclass
class SandboxState:
    hosts: list[SandboxHost]
    ssh_user: str
    ssh_key: str
    known_hosts: str
    gateway: str
    control_hostname: str
    registry: dict
    mirror: dict
    images: dict
    vllm_image: str
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    # Fleet mode: the gateway host, and the inventory written for the fleet.
    gateway_host: SandboxHost | None = None
    inventory: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SandboxState:
        data = dict(data)
        data["hosts"] = [SandboxHost(**h) for h in data.get("hosts", [])]
        if isinstance(data.get("gateway_host"), dict):
            data["gateway_host"] = SandboxHost(**data["gateway_host"])
        return cls(**data)


class _Paths:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()
        self.ssh_dir = self.root / "ssh"
        self.key = self.ssh_dir / "id_ed25519"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.state = self.root / "state.json"
        self.vllm_image = self.root / "vllm-image"
        self.mirror_root = self.root / "mirror"
        self.model = self.mirror_root / "Qwen" / "Qwen3-8B"
        self.mirror_log = self.root / "mirror.log"
        self.mirror_pid = self.root / "mirror.pid"
        self.lock = self.root / ".lock"
        self.fleet_inventory = self.root / fleet.INVENTORY_DIR


def load_state() -> SandboxState | None:
    """The state ``up()`` last wrote, or None."""
    path = _Paths().state
    if not path.is_file():
        return None
    return SandboxState.from_dict(json.loads(path.read_text()))


@contextlib.contextmanager
def _locked(paths: _Paths) -> Iterator[None]:
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another sandbox command to finish ({paths.lock})…")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# --- up ------------------------------------------------------------------------------------


def up(hosts: int = 1, *, gateway: bool = False, progress: Progress = print) -> SandboxState:
    """Bring the sandbox up with ``hosts`` sandbox hosts; reuse whatever already runs.

    Sandbox hosts it made earlier that are numbered above ``hosts`` are removed, so the
    sandbox matches the request. ``gateway`` adds the gateway host in front of them (fleet
    mode, see ``servekit.sandbox.fleet``); without it a gateway left from fleet mode goes.
    """
    fleet.check_request(hosts, gateway)
    fleet_mode = gateway  # below, `gateway` is the bridge's gateway address
    paths = _Paths()
    start = time.monotonic()
    with _locked(paths):
        with step(progress, "images"):
            refs = images.ensure_images(progress=progress)
        with step(progress, "what the vLLM release accepts"):
            vllm_facts.ensure_recorded(refs["vllm-cpu"], progress=progress)
        client = docker_client()
        gateway = bridge_gateway(client)

        with step(progress, "ssh key"):
            pubkey = _ensure_ssh_key(paths)

        with step(progress, f"registry {REGISTRY_CONTAINER} (127.0.0.1 and {gateway}:5000)"):
            _ensure_registry(client, refs["registry"], gateway, progress)
        with step(progress, "vllm-cpu image in the registry"):
            digest = _push_vllm_image(client, refs["vllm-cpu"], progress)
        remote_repo = vllm_registry_repo(f"{CONTROL_HOSTNAME}:{REGISTRY_PORT}")
        vllm_image = f"{remote_repo}@{digest}"
        paths.vllm_image.write_text(vllm_image + "\n")
        lock_dirs = [sandbox_inventory_dir()] + ([paths.fleet_inventory] if fleet_mode else [])
        with step(progress, "image locks of the sandbox inventories"):
            for directory in lock_dirs:
                _lock_sandbox_image(directory, progress)

        with step(progress, f"model mirror on http://{gateway}:{MIRROR_PORT}"):
            mirror_pid = _ensure_mirror(paths, gateway, progress)

        if not fleet_mode:
            _remove_gateway(client, progress)  # frees 127.0.0.1:8000 for host 1
        sandbox_hosts = []
        for n in range(1, hosts + 1):
            with step(progress, f"sandbox host {host_container(n)} (ssh 127.0.0.1:{ssh_port(n)})"):
                host = _ensure_host(
                    client, n, refs["sandbox-host"], gateway, pubkey, paths, progress, fleet_mode
                )
                sandbox_hosts.append(host)
        _remove_extra_hosts(client, hosts, progress)
        gateway_host = None
        if fleet_mode:
            name = fleet.GATEWAY_CONTAINER
            with step(progress, f"gateway host {name} (ssh 127.0.0.1:{fleet.GATEWAY_SSH_PORT})"):
                gateway_host = _ensure_gateway(
                    client, refs["sandbox-host"], gateway, pubkey, paths, progress
                )
            inventory_file = fleet.write_inventory(
                paths.fleet_inventory, sandbox_hosts, gateway_host, repo_root()
            )
            progress(f"  fleet inventory: {inventory_file}")
        else:
            fleet.remove_inventory(paths.fleet_inventory)
        _write_known_hosts(client, sandbox_hosts + ([gateway_host] if gateway_host else []), paths)

        state = SandboxState(
            hosts=sandbox_hosts,
            ssh_user="root",
            ssh_key=str(paths.key),
            known_hosts=str(paths.known_hosts),
            gateway=gateway,
            control_hostname=CONTROL_HOSTNAME,
            registry={
                "container": REGISTRY_CONTAINER,
                "volume": REGISTRY_VOLUME,
                "local": f"127.0.0.1:{REGISTRY_PORT}",
                "remote": f"{CONTROL_HOSTNAME}:{REGISTRY_PORT}",
            },
            mirror={
                "url": f"http://{CONTROL_HOSTNAME}:{MIRROR_PORT}",
                "local_url": f"http://{gateway}:{MIRROR_PORT}",
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
        _write_json(paths.state, state.to_dict())
    progress(
        f"sandbox up in {fmt_duration(time.monotonic() - start)}: {len(sandbox_hosts)} host(s)"
        + (" and a gateway" if fleet_mode else "")
        + f", state in {paths.state}"
    )
    return state


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


def _ensure_ssh_key(paths: _Paths) -> str:
    paths.ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.ssh_dir, 0o700)
    if not paths.key.is_file():
        cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "servekit-sandbox"]
        subprocess.run([*cmd, "-f", str(paths.key)], check=True)
    os.chmod(paths.key, 0o600)
    return Path(f"{paths.key}.pub").read_text().strip()


def _get_container(client, name: str):
    from docker.errors import NotFound

    try:
        return client.containers.get(name)
    except NotFound:
        return None


def _ensure_volume(client, name: str) -> None:
    from docker.errors import NotFound

    try:
        client.volumes.get(name)
    except NotFound:
        client.volumes.create(name=name, labels={VOLUME_LABEL: "1"})


def _http_get(url: str, timeout: float = 2.0):
    import requests

    try:
        return requests.get(url, timeout=timeout)
    except requests.RequestException:
        return None


def _wait_until(check, what: str, timeout: float = READY_TIMEOUT_S, interval: float = 0.2):
    """Call ``check()`` until it returns a truthy value; raise SandboxError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SandboxError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _ensure_registry(client, image: str, gateway: str, progress: Progress) -> None:
    container = _get_container(client, REGISTRY_CONTAINER)
    image_id = client.images.get(image).id
    if container is not None:
        if container.status == "running" and container.image.id == image_id:
            progress("  registry already running")
        else:
            container.remove(force=True)
            container = None
    if container is None:
        _ensure_volume(client, REGISTRY_VOLUME)
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

    def ready():
        container.reload()
        if container.status not in ("running", "created"):
            logs = container.logs(tail=20).decode(errors="replace")
            raise SandboxError(f"the registry container stopped ({container.status}):\n{logs}")
        resp = _http_get(f"http://127.0.0.1:{REGISTRY_PORT}/v2/")
        return resp is not None and resp.status_code == 200

    _wait_until(ready, "the registry's /v2/", timeout=60)


def registry_digest(registry: str, repo: str, tag: str) -> str | None:
    """The manifest digest the registry has for ``repo:tag``, or None."""
    try:
        return resolve_digest(f"{registry}/{repo}:{tag}", timeout=10)
    except RegistryError:
        return None


def _push_vllm_image(client, ref: str, progress: Progress) -> str:
    """Push the vLLM image to the local registry (unless it holds it already); its digest."""
    local_registry = f"127.0.0.1:{REGISTRY_PORT}"
    repo = vllm_registry_repo(local_registry)
    tag = ref.rsplit(":", 1)[1]
    image = client.images.get(ref)
    digest = registry_digest(local_registry, "servekit/vllm-cpu", tag)
    version_tag = sandbox_vllm_tag()
    if digest and f"{repo}@{digest}" in (image.attrs.get("RepoDigests") or []):
        progress(f"  registry already has {repo}:{tag} ({digest[:19]}…)")
        # The release tag is set when this build is first pushed; a later push by someone
        # else is theirs (the lock decides what deploys), unless the tag is missing.
        if registry_digest(local_registry, "servekit/vllm-cpu", version_tag) is None:
            _push_tag(client, image, repo, version_tag, progress)
        return digest
    digest = _push_tag(client, image, repo, tag, progress)
    _push_tag(client, image, repo, version_tag, progress)
    return digest


def sandbox_inventory_dir() -> Path:
    """The single-host sandbox inventory in the checkout; its image lock is the sandbox's."""
    return repo_root() / "inventory" / "sandbox"


def sandbox_vllm_tag() -> str:
    """The release tag of the sandbox's vLLM image, as the vllm_service role names it."""
    return f"v{vllm_version(repo_root())}"


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
    digest = registry_digest(registry, "servekit/vllm-cpu", tag)
    if not digest:
        raise SandboxError(f"the registry does not list {repo}:{tag} after the push")
    if aux_digest and aux_digest != digest:
        raise SandboxError(f"pushed digest {aux_digest} but the registry serves {digest}")
    return digest


def _lock_sandbox_image(directory: Path, progress: Progress) -> None:
    """Lock the sandbox's vLLM release tag beside the inventory in ``directory``, as
    `make lock-images` does on a site, unless it is locked already (a moved tag is reported
    by `make deploy`, never followed silently)."""
    remote = f"{vllm_registry_repo(f'{CONTROL_HOSTNAME}:{REGISTRY_PORT}')}:{sandbox_vllm_tag()}"
    directory.mkdir(parents=True, exist_ok=True)
    path = image_lock.lock_path(directory)
    if remote in image_lock.read_lock(path):
        progress(f"  {path} locks {remote} already")
        return
    statuses = image_lock.lock([remote], path, resolve=resolve_sandbox_digest)
    progress(f"  {path}: {remote} at {statuses[0].current}")


#: The sandbox registry as the sandbox hosts name it -> as this machine reaches it.
REGISTRY_ALIASES = {f"{CONTROL_HOSTNAME}:{REGISTRY_PORT}": f"127.0.0.1:{REGISTRY_PORT}"}
resolve_sandbox_digest = aliased(resolve_digest, REGISTRY_ALIASES)


# --- model mirror --------------------------------------------------------------------------

_MIRROR_CODE = (
    "import sys; from pathlib import Path; from servekit.mirror.server import serve; "
    "serve(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))"
)


def _python() -> str:
    venv = repo_root() / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _ensure_test_model(paths: _Paths, progress: Progress) -> None:
    if (paths.model / "config.json").is_file():
        return
    from servekit import testmodel

    partial = paths.model.with_name(paths.model.name + ".partial")
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    testmodel.generate(partial)
    if paths.model.exists():
        subprocess.run(["rm", "-rf", str(paths.model)], check=True)
    partial.rename(paths.model)
    progress(f"  test model generated in {paths.model} ({fmt_duration(time.monotonic() - t0)})")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _is_mirror_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"servekit" in cmdline and b"mirror" in cmdline


def _mirror_pid(paths: _Paths) -> int | None:
    """The pid of the mirror this sandbox started, if it still runs."""
    try:
        pid = int(paths.mirror_pid.read_text().strip())
    except (OSError, ValueError):
        return None
    if _pid_alive(pid) and _is_mirror_process(pid):
        return pid
    return None


def _mirror_healthy(url: str) -> bool:
    resp = _http_get(f"{url}/healthz")
    return resp is not None and resp.status_code == 200


def _ensure_mirror(paths: _Paths, gateway: str, progress: Progress) -> int:
    _ensure_test_model(paths, progress)
    url = f"http://{gateway}:{MIRROR_PORT}"
    pid = _mirror_pid(paths)
    if pid is not None:
        if _mirror_healthy(url):
            progress(f"  mirror already running (pid {pid})")
            return pid
        _stop_mirror(paths, progress)
    elif _mirror_healthy(url):
        raise SandboxError(
            f"something already answers on {url} that this sandbox did not start "
            f"(no live pid in {paths.mirror_pid}); stop it and run up again"
        )
    env = dict(os.environ)
    src = str(repo_root() / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(paths.mirror_log, "ab") as log:
        proc = subprocess.Popen(
            [_python(), "-c", _MIRROR_CODE, str(paths.mirror_root), gateway, str(MIRROR_PORT)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(repo_root()),
            env=env,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    paths.mirror_pid.write_text(f"{proc.pid}\n")

    def ready():
        if proc.poll() is not None:
            tail = _tail(paths.mirror_log)
            raise SandboxError(
                f"the mirror exited with {proc.returncode}; {paths.mirror_log}:\n{tail}"
            )
        return _mirror_healthy(url)

    _wait_until(ready, f"{url}/healthz", timeout=60)
    return proc.pid


def _stop_mirror(paths: _Paths, progress: Progress) -> None:
    pid = _mirror_pid(paths)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pid in _CHILDREN:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    _CHILDREN[pid].wait(timeout=0.2)
            if not _pid_alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        if pid in _CHILDREN:
            _CHILDREN.pop(pid).wait()
        progress(f"  mirror stopped (pid {pid})")
    paths.mirror_pid.unlink(missing_ok=True)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- sandbox hosts -------------------------------------------------------------------------


def _authorized_keys_tar(pubkey: str) -> bytes:
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
    docker_volume: str | None = None,
) -> dict:
    """Container settings of a sandbox host: systemd as PID 1, SSH and port 8000 published
    on 127.0.0.1, a volume for a nested Docker where one runs."""
    volumes = {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}}
    if docker_volume:
        volumes[docker_volume] = {"bind": "/var/lib/docker", "mode": "rw"}
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


def _host_run_kwargs(n: int, gateway: str, fleet_mode: bool = False) -> dict:
    """The container settings of sandbox host ``n`` (systemd as PID 1, nested Docker)."""
    return _systemd_host_kwargs(
        host_container(n),
        host_hostname(n),
        {ROLE_LABEL: ROLE_HOST, "servekit.sandbox.index": str(n)},
        ssh_port(n),
        api_port(n, fleet_mode),
        gateway,
        host_volume(n),
    )


def _gateway_run_kwargs(gateway: str) -> dict:
    """The gateway host: a sandbox host without nested Docker, owning 127.0.0.1:8000."""
    return _systemd_host_kwargs(
        fleet.GATEWAY_CONTAINER,
        fleet.GATEWAY_HOSTNAME,
        {ROLE_LABEL: fleet.ROLE_GATEWAY},
        fleet.GATEWAY_SSH_PORT,
        fleet.GATEWAY_API_PORT,
        gateway,
    )


def _published_port(container, port: str = "8000/tcp") -> int | None:
    bindings = (container.attrs.get("HostConfig", {}).get("PortBindings") or {}).get(port) or []
    return int(bindings[0]["HostPort"]) if bindings and bindings[0].get("HostPort") else None


def _bridge_address(container) -> str:
    container.reload()
    settings = container.attrs.get("NetworkSettings", {})
    return settings.get("IPAddress") or (
        (settings.get("Networks") or {}).get("bridge", {}).get("IPAddress") or ""
    )


def _ensure_host(
    client,
    n: int,
    image: str,
    gateway: str,
    pubkey: str,
    paths: _Paths,
    progress: Progress,
    fleet_mode: bool = False,
) -> SandboxHost:
    name = host_container(n)
    ssh, api = ssh_port(n), api_port(n, fleet_mode)
    container = _get_container(client, name)
    if container is not None and container.image.id != client.images.get(image).id:
        progress(f"  {name} runs an older sandbox-host image; `down` and `up` to recreate it")
    published = _published_port(container) if container is not None else None
    if container is not None and published not in (None, api):
        # Between single-host and fleet mode the API port moves: recreate the container
        # (its Docker volume, with the pulled vLLM image, stays); a deploy re-converges it.
        progress(f"  {name} publishes its API on {published}, not {api}: recreating it")
        _remove_container(client, container, progress, frozenset({host_volume(n)}))
        container = None
    if container is None:
        _ensure_volume(client, host_volume(n))
        container = client.containers.create(image, **_host_run_kwargs(n, gateway, fleet_mode))
        container.put_archive("/root", _authorized_keys_tar(pubkey))
        _start(container, ssh, api)
    else:
        container.put_archive("/root", _authorized_keys_tar(pubkey))
        if container.status != "running":
            progress(f"  starting the existing {name} ({container.status})")
            _start(container, ssh, api)
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
        address=_bridge_address(container),
    )


def _ensure_gateway(
    client, image: str, gateway: str, pubkey: str, paths: _Paths, progress: Progress
) -> SandboxHost:
    """The gateway host of fleet mode (the gateway role installs HAProxy on it)."""
    name = fleet.GATEWAY_CONTAINER
    ssh, api = fleet.GATEWAY_SSH_PORT, fleet.GATEWAY_API_PORT
    container = _get_container(client, name)
    if container is None:
        container = client.containers.create(image, **_gateway_run_kwargs(gateway))
    container.put_archive("/root", _authorized_keys_tar(pubkey))
    if container.status != "running":
        _start(container, ssh, api)
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
        address=_bridge_address(container),
    )


def _remove_gateway(client, progress: Progress) -> None:
    """Remove a gateway host left from fleet mode."""
    for container in _sandbox_containers(client, fleet.ROLE_GATEWAY):
        _remove_container(client, container, progress)


def _start(container, ssh: int, api: int) -> None:
    try:
        container.start()
    except Exception as exc:
        raise SandboxError(
            f"cannot start {container.name}: {exc} (are ports {ssh} and {api} on 127.0.0.1 free?)"
        ) from exc


def _exec(container, cmd: list[str]) -> tuple[int, str]:
    result = container.exec_run(cmd, demux=False)
    return result.exit_code, (result.output or b"").decode(errors="replace").strip()


def _wait_for_systemd(container, progress: Progress) -> None:
    seen: dict[str, str] = {}

    def ready():
        container.reload()
        if container.status != "running":
            logs = container.logs(tail=30).decode(errors="replace")
            raise SandboxError(f"{container.name} stopped ({container.status}):\n{logs}")
        _, out = _exec(container, ["systemctl", "is-system-running"])
        seen["state"] = out
        return out in ("running", "degraded")

    _wait_until(ready, f"systemd in {container.name} (last state: {seen.get('state')})")
    if seen["state"] == "degraded":
        _, failed = _exec(container, ["systemctl", "--failed", "--no-legend", "--plain"])
        progress(f"  systemd is degraded in {container.name}; failed units:\n{failed}")


def _host_keys(container) -> list[str]:
    _, out = _exec(container, ["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"])
    return [line for line in out.splitlines() if line.startswith(("ssh-", "ecdsa-"))]


def _write_known_hosts(client, hosts: list[SandboxHost], paths: _Paths) -> None:
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


def _wait_for_ssh(client, container, port: int, paths: _Paths) -> None:
    # The host's own keys go in a known_hosts file, so the check verifies the server too.
    _write_known_hosts(
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
        _wait_until(ready, f"ssh to {container.name} on 127.0.0.1:{port}", timeout=60)
    except SandboxError as exc:
        raise SandboxError(f"{exc}; last error: {last.get('err')}") from None


def _sandbox_containers(client, role: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{ROLE_LABEL}={role}"})


def _remove_container(client, container, progress: Progress, keep: frozenset = frozenset()) -> None:
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
        _remove_volume(client, name)
    progress(f"  removed {container.name}" + (f" and {', '.join(volumes)}" if volumes else ""))


def _remove_volume(client, name: str) -> None:
    from docker.errors import NotFound

    with contextlib.suppress(NotFound):
        client.volumes.get(name).remove(force=True)


def _remove_extra_hosts(client, keep: int, progress: Progress) -> None:
    """Remove sandbox hosts numbered above ``keep``. Only containers ``up()`` made (named
    servekit-sandbox-N with a matching index label) count: other containers run from the
    sandbox-host image carry its role label too, and are left alone here."""
    for container in _sandbox_containers(client, ROLE_HOST):
        index = container.labels.get("servekit.sandbox.index", "")
        if not index.isdigit() or container.name != host_container(int(index)):
            continue
        if int(index) > keep:
            _remove_container(client, container, progress)


# --- down ----------------------------------------------------------------------------------


def down(*, purge: bool = False, progress: Progress = print) -> None:
    """Remove every sandbox host, the registry, their volumes, and stop the mirror.

    The registry's storage is a cache of the built vLLM image (like the images themselves)
    and is kept, so the next `up` skips the push; ``purge`` removes it too.
    """
    paths = _Paths()
    start = time.monotonic()
    with _locked(paths):
        client = docker_client()
        for container in _sandbox_containers(client, ROLE_HOST):
            _remove_container(client, container, progress)
        _remove_gateway(client, progress)
        fleet.remove_inventory(paths.fleet_inventory)
        registries = _sandbox_containers(client, ROLE_REGISTRY)
        named = _get_container(client, REGISTRY_CONTAINER)
        if named is not None and named.id not in {c.id for c in registries}:
            registries.append(named)
        keep = frozenset() if purge else frozenset({REGISTRY_VOLUME})
        for container in registries:
            _remove_container(client, container, progress, keep)
        for volume in client.volumes.list(filters={"label": VOLUME_LABEL}):
            if volume.name != REGISTRY_VOLUME or purge:
                volume.remove(force=True)
        if purge:
            _remove_volume(client, REGISTRY_VOLUME)
        _stop_mirror(paths, progress)
        for path in (paths.state, paths.vllm_image, paths.known_hosts):
            path.unlink(missing_ok=True)
        if purge:  # the locked digests were in the registry's storage
            image_lock.lock_path(sandbox_inventory_dir()).unlink(missing_ok=True)
    progress(f"sandbox down ({fmt_duration(time.monotonic() - start)})")


# --- status --------------------------------------------------------------------------------


def status() -> dict:
    """What runs now (containers, registry, mirror) and which images are built."""
    paths = _Paths()
    result: dict = {"state_dir": str(paths.root), "docker": False, "hosts": []}
    try:
        client = docker_client(timeout=10)
    except SandboxError as exc:
        result["error"] = str(exc)
        return result
    result["docker"] = True

    def order(container) -> int:
        index = container.labels.get("servekit.sandbox.index", "")
        return int(index) if index.isdigit() else 0

    for container in sorted(_sandbox_containers(client, ROLE_HOST), key=order):
        index = container.labels.get("servekit.sandbox.index", "")
        result["hosts"].append(
            {
                "name": container.name,
                "status": container.status,
                "ssh_port": ssh_port(int(index)) if index.isdigit() else None,
                "api_port": _published_port(container),
                "image": (container.image.tags or [container.image.id])[0],
            }
        )
    gateways = _sandbox_containers(client, fleet.ROLE_GATEWAY)
    result["gateway"] = (
        {
            "name": gateways[0].name,
            "status": gateways[0].status,
            "ssh_port": _published_port(gateways[0], "22/tcp"),
            "api_port": _published_port(gateways[0]),
            "inventory": str(paths.fleet_inventory / "hosts.yml"),
        }
        if gateways
        else None
    )
    registry = _get_container(client, REGISTRY_CONTAINER)
    resp = _http_get(f"http://127.0.0.1:{REGISTRY_PORT}/v2/") if registry else None
    result["registry"] = {
        "container": registry.status if registry else None,
        "ready": bool(resp is not None and resp.status_code == 200),
    }
    gateway = bridge_gateway(client)
    pid = _mirror_pid(paths)
    url = f"http://{gateway}:{MIRROR_PORT}"
    result["mirror"] = {
        "pid": pid,
        "url": url,
        "healthy": bool(pid and _mirror_healthy(url)),
    }
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


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)

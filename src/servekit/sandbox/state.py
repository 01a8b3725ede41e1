"""What the sandbox is made of and where it keeps it: names, ports, ``.sandbox/``, the lock.

Every container, volume and port of the sandbox is named here; ``up()`` records what it made
in ``.sandbox/state.json`` (:class:`SandboxState`), which :func:`load_state` reads back. Sandbox
commands hold ``.sandbox/.lock`` while they run, so two never change the sandbox at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkout import repo_root
from .common import state_dir

#: Docker label of every container the sandbox makes, with its role as the value.
ROLE_LABEL = "servekit.role"
ROLE_HOST = "sandbox-host"
ROLE_REGISTRY = "registry"
#: Docker label holding a sandbox host's number.
INDEX_LABEL = "servekit.sandbox.index"
#: Label on every volume the sandbox creates, so ``down()`` finds them all.
VOLUME_LABEL = "servekit.sandbox"

#: This machine, as the sandbox hosts name it (the Docker bridge's gateway address).
CONTROL_HOSTNAME = "servekit-control"
SSH_PORT_BASE = 2221


def host_container(n: int) -> str:
    return f"servekit-sandbox-{n}"


def host_hostname(n: int) -> str:
    return f"sandbox-{n}"


def host_volume(n: int) -> str:
    return f"servekit-sandbox-{n}-docker"


#: Where the vllm_service role keeps vLLM's compile cache (vllm_service_compile_cache_dir).
COMPILE_CACHE_DIR = "/var/cache/vllm"


def cache_volume(n: int) -> str:
    """Host ``n``'s compile cache: a volume, like its /var/lib/docker, so that a recreated host
    keeps what its server compiled, and a fleet's new hosts can start with a copy of host 1's."""
    return f"servekit-sandbox-{n}-vllm-cache"


def ssh_port(n: int) -> int:
    """Host 1 -> 2222, host 2 -> 2223, ..."""
    return SSH_PORT_BASE + n


def sandbox_inventory_dir() -> Path:
    """The single-host sandbox inventory in the checkout; its image lock is the sandbox's."""
    return repo_root() / "inventory" / "sandbox"


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


class SandboxPaths:
    """The files of the sandbox under its state directory (``.sandbox/``)."""

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
        # Fleet mode's inventory (servekit.sandbox.fleet writes it).
        self.fleet_inventory = self.root / "inventory"


def load_state() -> SandboxState | None:
    """The state ``up()`` last wrote, or None."""
    path = SandboxPaths().state
    if not path.is_file():
        return None
    return SandboxState.from_dict(json.loads(path.read_text()))


def write_state(paths: SandboxPaths, state: SandboxState) -> None:
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    tmp.replace(paths.state)


@contextlib.contextmanager
def locked(paths: SandboxPaths) -> Iterator[None]:
    """Hold the sandbox's lock (waiting, and saying so, while another command holds it)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another sandbox command to finish ({paths.lock})…")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield

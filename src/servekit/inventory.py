"""Read probe targets from an Ansible inventory (via `ansible-inventory`, so every format works).

`ansible-inventory --list` does not template: a value may still be a Jinja expression
(`"{{ vault_vllm_service_api_key }}"`) or an encrypted vault value. Simple references to
other plain variables (`"http://{{ ansible_host }}:8000"`) are resolved here; anything else
counts as unknown and falls back to the role default, except the API key, which then comes
from the environment variable ``SERVEKIT_API_KEY``.

Every question below takes an :class:`Inventory` (read once with ``Inventory.read``) or a path
(read again for that question): a command that asks several reads it once and passes it on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "SERVEKIT_API_KEY"
_SIMPLE_REF = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class ProbeTarget:
    host: str
    url: str
    model: str
    api_key: str | None
    max_model_len: int | None
    reasoning_parser: str | None
    # Where api_key came from: "inventory", "env" (SERVEKIT_API_KEY), "none" (no key
    # configured) or "unresolved" (a template or vault value and SERVEKIT_API_KEY unset).
    api_key_source: str = "none"
    # The probes to run (None: all of them). A gateway refuses /metrics unless told otherwise.
    checks: tuple[str, ...] | None = None
    # "host" (a vLLM server) or "gateway" (the endpoint in front of them).
    kind: str = "host"


class InventoryError(RuntimeError):
    """`ansible-inventory` could not read the inventory."""


def _ansible_inventory() -> str:
    beside = Path(sys.executable).with_name("ansible-inventory")
    return (
        str(beside)
        if beside.exists()
        else (shutil.which("ansible-inventory") or "ansible-inventory")
    )


def is_unresolved(value: object) -> bool:
    """True for a Jinja template or an Ansible Vault value: meaningless without Ansible."""
    if isinstance(value, dict) and "__ansible_vault" in value:
        return True
    return isinstance(value, str) and (
        "{{" in value or "{%" in value or value.startswith("$ANSIBLE_VAULT")
    )


def load_inventory(inventory: Path) -> dict:
    """`ansible-inventory -i INVENTORY --list` as a dict."""
    try:
        out = subprocess.run(
            [_ansible_inventory(), "-i", str(inventory), "--list"],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "ANSIBLE_VERBOSITY": "0"},
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise InventoryError(
            f"ansible-inventory cannot read {inventory}: {exc.stderr.strip() or exc}"
        ) from exc
    return json.loads(out)


@dataclass(frozen=True)
class Inventory:
    """An inventory read once (`ansible-inventory --list`), then asked any number of questions.

    The functions below take one of these or a path; given a path, each reads it again.
    """

    path: Path
    data: dict

    @classmethod
    def read(cls, path: Path) -> Inventory:
        return cls(Path(path), load_inventory(Path(path)))

    def hostvars(self, group: str = "gpu_hosts") -> dict[str, dict]:
        """The variables of every host of ``group`` (and its child groups), in inventory order."""
        return hostvars_of(self.data, group)

    def hosts(self, group: str = "gpu_hosts") -> list[str]:
        return list(self.hostvars(group))


def _read(inventory: Inventory | Path) -> Inventory:
    return inventory if isinstance(inventory, Inventory) else Inventory.read(inventory)


def load_hostvars(inventory: Inventory | Path, group: str = "gpu_hosts") -> dict[str, dict]:
    """The variables of every host of ``group`` (and its child groups), in inventory order."""
    return _read(inventory).hostvars(group)


def hostvars_of(data: dict, group: str) -> dict[str, dict]:
    """``load_hostvars`` over an inventory already read with ``load_inventory``."""
    hostvars = data.get("_meta", {}).get("hostvars", {})
    return {h: hostvars.get(h, {}) for h in _group_hosts(data, group)}


def group_hosts(inventory: Inventory | Path, group: str = "gpu_hosts") -> list[str]:
    return _read(inventory).hosts(group)


def _group_hosts(data: dict, group: str) -> list[str]:
    entry = data.get(group, {})
    hosts = list(entry.get("hosts", []))
    for child in entry.get("children", []):
        hosts.extend(h for h in _group_hosts(data, child) if h not in hosts)
    return hosts


def _plain(value: object, hv: Mapping[str, object] | None = None) -> object:
    """A usable value: as is, or with simple ``{{ var }}`` references to plain variables
    resolved; None when it stays a template or is a vault value."""
    if isinstance(value, str) and hv is not None and "{{" in value:

        def ref(match: re.Match[str]) -> str:
            found = hv.get(match.group(1))
            ok = isinstance(found, str | int) and not is_unresolved(found)
            return str(found) if ok else match.group(0)

        value = _SIMPLE_REF.sub(ref, value)
    return None if is_unresolved(value) else value


def _api_key(hv: Mapping[str, object], env: Mapping[str, str]) -> tuple[str | None, str]:
    raw = hv.get("vllm_service_api_key")
    if raw == "":
        return None, "none"
    if raw is None:
        # Not in the inventory (given at deploy time with -e or a vars file elsewhere):
        # the operator passes it on.
        from_env = env.get(API_KEY_ENV) or None
        return from_env, "env" if from_env else "none"
    if is_unresolved(raw):
        from_env = env.get(API_KEY_ENV) or None
        return from_env, "env" if from_env else "unresolved"
    return str(raw), "inventory"


def probe_targets(
    inventory: Inventory | Path, group: str = "gpu_hosts", env: Mapping[str, str] | None = None
) -> list[ProbeTarget]:
    """One probe target per host of ``group``. ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    targets = []
    for host, hostvars in load_hostvars(inventory, group).items():
        hv = {"inventory_hostname": host, **hostvars}
        port = _plain(hv.get("vllm_service_port"), hv) or 8000
        address = _plain(hv.get("ansible_host"), hv) or host
        bind = _plain(hv.get("vllm_service_bind_address"), hv) or "127.0.0.1"
        if bind not in ("0.0.0.0", "127.0.0.1", "::", "localhost"):
            address = f"[{bind}]" if ":" in str(bind) else bind
        url = _plain(hv.get("servekit_probe_url"), hv) or f"http://{address}:{port}"
        parser = _plain(hv.get("vllm_service_reasoning_parser"), hv)
        api_key, source = _api_key(hv, env)
        targets.append(
            ProbeTarget(
                host=host,
                url=str(url),
                model=str(_plain(hv.get("vllm_service_served_model_name"), hv) or "Qwen3-8B"),
                api_key=api_key,
                max_model_len=int(_plain(hv.get("vllm_service_max_model_len"), hv) or 8192),
                reasoning_parser="qwen3" if parser is None else (str(parser) or None),
                api_key_source=source,
            )
        )
    return targets


def _gateway_api_key(
    hv: Mapping[str, object], backend: ProbeTarget | None, env: Mapping[str, str]
) -> tuple[str | None, str]:
    """The key a client sends through the gateway: the gateway's own when it checks one,
    else the backends' (the header is passed on to them)."""
    raw = hv.get("gateway_api_key")
    if raw is None or raw == "":
        return (backend.api_key, backend.api_key_source) if backend else (None, "none")
    if is_unresolved(raw):
        from_env = env.get(API_KEY_ENV) or None
        return from_env, "env" if from_env else "unresolved"
    return str(raw), "inventory"


def gateway_targets(
    inventory: Inventory | Path,
    group: str = "gateway",
    backend_group: str = "gpu_hosts",
    env: Mapping[str, str] | None = None,
) -> list[ProbeTarget]:
    """One probe target per gateway host: its URL (``servekit_probe_url``, else its address
    and ``gateway_port``), the model the backends serve, and every probe but ``metrics``
    unless ``gateway_expose_metrics`` is true."""
    from servekit.probe import PROBE_NAMES

    env = os.environ if env is None else env
    inventory = _read(inventory)
    gateways = inventory.hostvars(group)
    if not gateways:
        return []
    backends = probe_targets(inventory, backend_group, env)
    first = backends[0] if backends else None
    targets = []
    for host, hostvars in gateways.items():
        hv = {"inventory_hostname": host, **hostvars}
        port = _plain(hv.get("gateway_port"), hv) or 8000
        address = _plain(hv.get("ansible_host"), hv) or host
        bind = _plain(hv.get("gateway_bind_address"), hv) or "0.0.0.0"
        if bind not in ("0.0.0.0", "127.0.0.1", "::", "localhost"):
            address = f"[{bind}]" if ":" in str(bind) else bind
        url = _plain(hv.get("servekit_probe_url"), hv) or f"http://{address}:{port}"
        exposed = _plain(hv.get("gateway_expose_metrics"), hv) is True
        api_key, source = _gateway_api_key(hv, first, env)
        targets.append(
            ProbeTarget(
                host=host,
                url=str(url),
                model=first.model if first else "Qwen3-8B",
                api_key=api_key,
                max_model_len=first.max_model_len if first else 8192,
                reasoning_parser=first.reasoning_parser if first else "qwen3",
                api_key_source=source,
                checks=None if exposed else tuple(n for n in PROBE_NAMES if n != "metrics"),
                kind="gateway",
            )
        )
    return targets

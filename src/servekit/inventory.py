"""Read probe targets from an Ansible inventory (via `ansible-inventory`, so every format works)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProbeTarget:
    host: str
    url: str
    model: str
    api_key: str | None
    max_model_len: int | None
    reasoning_parser: str | None


def _ansible_inventory() -> str:
    beside = Path(sys.executable).with_name("ansible-inventory")
    return (
        str(beside)
        if beside.exists()
        else (shutil.which("ansible-inventory") or "ansible-inventory")
    )


def load_hostvars(inventory: Path, group: str = "gpu_hosts") -> dict[str, dict]:
    out = subprocess.run(
        [_ansible_inventory(), "-i", str(inventory), "--list"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(out)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    hosts = _group_hosts(data, group)
    return {h: hostvars.get(h, {}) for h in hosts}


def _group_hosts(data: dict, group: str) -> list[str]:
    entry = data.get(group, {})
    hosts = list(entry.get("hosts", []))
    for child in entry.get("children", []):
        hosts.extend(h for h in _group_hosts(data, child) if h not in hosts)
    return hosts


def _plain(value: object) -> object:
    """Inventory values that are still Jinja templates are of no use outside Ansible."""
    if isinstance(value, str) and "{{" in value:
        return None
    return value


def probe_targets(inventory: Path, group: str = "gpu_hosts") -> list[ProbeTarget]:
    targets = []
    for host, hv in load_hostvars(inventory, group).items():
        port = _plain(hv.get("vllm_service_port")) or 8000
        address = _plain(hv.get("ansible_host")) or host
        bind = _plain(hv.get("vllm_service_bind_address")) or "127.0.0.1"
        if bind not in ("0.0.0.0", "127.0.0.1", "::", "localhost"):
            address = bind
        url = _plain(hv.get("servekit_probe_url")) or f"http://{address}:{port}"
        parser = _plain(hv.get("vllm_service_reasoning_parser"))
        targets.append(
            ProbeTarget(
                host=host,
                url=str(url),
                model=str(_plain(hv.get("vllm_service_served_model_name")) or "Qwen3-8B"),
                api_key=_plain(hv.get("vllm_service_api_key")) or None,
                max_model_len=int(_plain(hv.get("vllm_service_max_model_len")) or 8192),
                reasoning_parser="qwen3" if parser is None else (parser or None),
            )
        )
    return targets

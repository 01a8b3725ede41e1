"""Filters that read nvidia-smi and /proc/driver/nvidia output for the GPU roles' checks.

Pure functions over text, so the post-install checks are unit-tested against recorded output.
"""

from __future__ import annotations

import csv
import io
import re

_GPU_HEADER = re.compile(r"^GPU\s+([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\s*$")
_FIELD = re.compile(r"^(\s*)([^:]+?)\s*:\s*(.*?)\s*$")

SMI_GPU_FIELDS = ("driver_version", "pci_bus_id", "name", "persistence_mode")


def nvidia_smi_gpus(text: str) -> list[dict]:
    """Parse ``nvidia-smi --query-gpu=driver_version,pci.bus_id,name,persistence_mode
    --format=csv,noheader`` into one dict per GPU."""
    gpus = []
    for row in csv.reader(io.StringIO(text or ""), skipinitialspace=True):
        if not row or not any(cell.strip() for cell in row):
            continue
        values = [cell.strip() for cell in row] + [""] * len(SMI_GPU_FIELDS)
        gpus.append(dict(zip(SMI_GPU_FIELDS, values[: len(SMI_GPU_FIELDS)], strict=True)))
    return gpus


def nvidia_smi_fabric(text: str) -> list[dict]:
    """Fabric state and status of each GPU from ``nvidia-smi -q`` (``N/A`` where the GPU
    reports no NVLink fabric)."""
    result: list[dict] = []
    current: dict | None = None
    fabric_indent: int | None = None
    for line in (text or "").splitlines():
        header = _GPU_HEADER.match(line.strip())
        if header and not line.startswith(" "):
            current = {"pci_bus_id": header.group(1), "state": "N/A", "status": "N/A"}
            result.append(current)
            fabric_indent = None
            continue
        if current is None:
            continue
        indent = len(line) - len(line.lstrip(" "))
        stripped = line.strip()
        if stripped == "Fabric":
            fabric_indent = indent
            continue
        if fabric_indent is None:
            continue
        if stripped and indent <= fabric_indent:
            fabric_indent = None
            continue
        field = _FIELD.match(line)
        if field and len(field.group(1)) > fabric_indent:
            key = field.group(2).strip().lower()
            if key in ("state", "status") and field.group(3):
                current[key] = field.group(3)
    return result


def nvidia_module_flavour(text: str) -> str:
    """``open`` or ``proprietary`` from /proc/driver/nvidia/version; ``none`` when empty."""
    if not (text or "").strip():
        return "none"
    return "open" if "Open Kernel Module" in text else "proprietary"


class FilterModule:
    def filters(self):
        return {
            "servekit_nvidia_smi_gpus": nvidia_smi_gpus,
            "servekit_nvidia_smi_fabric": nvidia_smi_fabric,
            "servekit_nvidia_module_flavour": nvidia_module_flavour,
        }

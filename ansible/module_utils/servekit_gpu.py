"""NVIDIA GPU and NVSwitch detection from PCI data, usable before any driver is installed.

Pure Python (standard library only) so the Ansible module ``servekit_gpu_facts`` and the unit
tests share one implementation.  Input is either ``lspci -nn [-D]`` text or the vendor/device/
class files under ``/sys/bus/pci/devices``; output is the ``servekit_gpu`` fact.

Decisions taken here:

* architecture of each GPU: from a table of known data-center ids, else from the chip code name
  that ``lspci`` prints (``GH100``, ``AD102GL``...), else from NVIDIA's device-id ranges;
* kernel module flavour: ``open`` when every GPU supports the open modules (Turing and newer),
  ``proprietary`` when a GPU needs them (Maxwell, Pascal, Volta), ``None`` without GPUs or when
  no single flavour drives all GPUs (reported in ``problems``);
* Fabric Manager: required on NVSwitch systems (NVSwitch PCI endpoints, entries under
  ``/proc/driver/nvidia-nvswitch/devices``) and on HGX Blackwell baseboards, whose NVSwitches are
  not on the host's PCI bus.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

NVIDIA_VENDOR_ID = "10de"

# Oldest first.  "kepler" stands for everything older than Maxwell too.
ARCHITECTURES = (
    "kepler",
    "maxwell",
    "pascal",
    "volta",
    "turing",
    "ampere",
    "ada",
    "hopper",
    "blackwell",
    "rubin",
)

# NVIDIA: the open kernel modules support Turing and newer; Maxwell, Pascal and Volta need the
# proprietary modules; Blackwell (and newer) is supported by the open modules only.
OPEN_MODULES_SUPPORTED = frozenset({"turing", "ampere", "ada", "hopper", "blackwell", "rubin"})
OPEN_MODULES_REQUIRED = frozenset({"blackwell", "rubin"})

# Last driver branch that still supports an architecture (R580 is the last for
# Maxwell/Pascal/Volta, R470 the last for Kepler).  Architectures not listed have no limit.
LAST_DRIVER_BRANCH = {"kepler": 470, "maxwell": 580, "pascal": 580, "volta": 580}

CODE_NAME_ARCHITECTURE = {
    "GK": "kepler",
    "GM": "maxwell",
    "GP": "pascal",
    "GV": "volta",
    "TU": "turing",
    "GA": "ampere",
    "AD": "ada",
    "GH": "hopper",
    "GB": "blackwell",
    "GR": "rubin",
}

# Device-id ranges of NVIDIA GPU functions (class 03xx), checked in order, first match wins.
# Derived from the pci.ids database; used when lspci prints no chip name (sysfs, old pci.ids).
DEVICE_ID_RANGES = (
    (0x15C0, 0x15FF, "pascal"),  # GP100
    (0x1720, 0x172F, "pascal"),  # GP100 variants
    (0x1340, 0x17FF, "maxwell"),  # GM107..GM200
    (0x1B00, 0x1D7F, "pascal"),  # GP102..GP108
    (0x1D80, 0x1DFF, "volta"),  # GV100
    (0x1E00, 0x1FFF, "turing"),  # TU102..TU117
    (0x2080, 0x20FF, "ampere"),  # GA100
    (0x2100, 0x21FF, "turing"),  # TU116
    (0x2200, 0x22FF, "ampere"),  # GA102
    (0x2300, 0x23FF, "hopper"),  # GH100
    (0x2400, 0x25FF, "ampere"),  # GA103..GA107
    (0x2600, 0x28FF, "ada"),  # AD102..AD107
    (0x2900, 0x2FFF, "blackwell"),  # GB100, GB102, GB20x
    (0x3000, 0x30FF, "rubin"),  # GR100
    (0x3100, 0x33FF, "blackwell"),  # GB110 (Blackwell Ultra), GB112, GB120
    (0x0000, 0x133F, "kepler"),  # Kepler and older
)

# Data-center GPUs by device id: (name, architecture).  Names as in pci.ids.
KNOWN_GPUS = {
    "13f2": ("Tesla M60", "maxwell"),
    "17fd": ("Tesla M40", "maxwell"),
    "15f7": ("Tesla P100 PCIe 12GB", "pascal"),
    "15f8": ("Tesla P100 PCIe 16GB", "pascal"),
    "15f9": ("Tesla P100 SXM2 16GB", "pascal"),
    "1b38": ("Tesla P40", "pascal"),
    "1bb3": ("Tesla P4", "pascal"),
    "1db1": ("Tesla V100 SXM2 16GB", "volta"),
    "1db4": ("Tesla V100 PCIe 16GB", "volta"),
    "1db5": ("Tesla V100 SXM2 32GB", "volta"),
    "1db6": ("Tesla V100 PCIe 32GB", "volta"),
    "1df6": ("Tesla V100S PCIe 32GB", "volta"),
    "1eb8": ("Tesla T4", "turing"),
    "20b0": ("A100 SXM4 40GB", "ampere"),
    "20b2": ("A100 SXM4 80GB", "ampere"),
    "20b5": ("A100 PCIe 80GB", "ampere"),
    "20f1": ("A100 PCIe 40GB", "ampere"),
    "2236": ("A10", "ampere"),
    "2237": ("A10G", "ampere"),
    "25b6": ("A2 / A16", "ampere"),
    "2321": ("H100L 94GB", "hopper"),
    "2324": ("H800", "hopper"),
    "2329": ("H20", "hopper"),
    "2330": ("H100 SXM5 80GB", "hopper"),
    "2331": ("H100 PCIe", "hopper"),
    "2335": ("H200 SXM 141GB", "hopper"),
    "2337": ("H100 SXM5 64GB", "hopper"),
    "2339": ("H100 SXM5 94GB", "hopper"),
    "233b": ("H200 NVL", "hopper"),
    "233d": ("H100 96GB", "hopper"),
    "2342": ("GH200 120GB / 480GB", "hopper"),
    "2348": ("GH200 144G HBM3e", "hopper"),
    "26b5": ("L40", "ada"),
    "26b9": ("L40S", "ada"),
    "27b8": ("L4", "ada"),
    "2901": ("B200", "blackwell"),
    "2941": ("HGX GB200", "blackwell"),
    "2bb5": ("RTX PRO 6000 Blackwell Server Edition", "blackwell"),
    "3182": ("B300 SXM6 AC", "blackwell"),
    "31c2": ("GB300", "blackwell"),
}

# GPUs that sit on an HGX Blackwell baseboard: their NVSwitches are managed over NVLink
# management NICs, not host PCIe, so Fabric Manager is needed although no NVSwitch is listed.
HGX_NVLINK_BASEBOARD_GPUS = frozenset({"2901", "3182"})

# NVSwitch PCI endpoints: LR10 (HGX A100) and LS10 (HGX H100/H200), as listed by the NVSwitch
# kernel driver.
NVSWITCH_DEVICE_IDS = frozenset(
    {"1ae8"}
    | {f"{i:04x}" for i in range(0x1AF0, 0x1B00)}
    | {f"{i:04x}" for i in range(0x22A0, 0x22B0)}
)

GPU_CLASS_PREFIX = "03"  # 0300 VGA, 0302 3D controller, 0380 display controller

_LSPCI_LINE = re.compile(
    r"^(?P<address>(?:[0-9a-fA-F]{4,}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+"
    r"(?P<class_name>[^\[]*?)\s*\[(?P<class_id>[0-9a-fA-F]{4})\]:\s+"
    r"(?P<description>.*?)\s*\[(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})\]"
    r"(?P<rest>.*)$"
)
_CODE_NAME = re.compile(r"\b(GK|GM|GP|GV|TU|GA|AD|GH|GB|GR)\d{2,3}[A-Z]*\b")
_MODEL_NAME = re.compile(r"\[([^\[\]]+)\]\s*$")


@dataclass(frozen=True)
class PciDevice:
    """One PCI function: address, 4-hex-digit vendor/device/class ids, lspci description."""

    address: str
    vendor_id: str
    device_id: str
    class_id: str
    description: str = ""


class GpuDetectionError(Exception):
    """Raised when PCI data cannot be read or parsed."""


def normalize_address(address: str) -> str:
    """Return a PCI address with its domain, lowercase: ``1b:00.0`` -> ``0000:1b:00.0``."""
    address = address.strip().lower()
    if address.count(":") == 1:
        address = "0000:" + address
    return address


def parse_lspci(text: str) -> list[PciDevice]:
    """Parse ``lspci -nn`` (or ``lspci -nn -D``) output.

    Lines that are not device lines (blank lines, ``-v`` detail lines) are ignored.  Raises
    ``GpuDetectionError`` when non-empty text holds no device line at all, since that means the
    output is not what we think it is (``lspci`` without ``-nn`` has no ids).
    """
    devices = []
    meaningful = 0
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip() or line[0].isspace():
            continue
        meaningful += 1
        match = _LSPCI_LINE.match(line)
        if not match:
            continue
        devices.append(
            PciDevice(
                address=normalize_address(match["address"]),
                vendor_id=match["vendor"].lower(),
                device_id=match["device"].lower(),
                class_id=match["class_id"].lower(),
                description=match["description"].strip(),
            )
        )
    if meaningful and not devices:
        raise GpuDetectionError(
            "no device line with [vendor:device] ids found; the text must come from `lspci -nn`"
        )
    return devices


def _read_hex(path: str) -> str:
    with open(path, encoding="ascii") as handle:
        value = handle.read().strip().lower()
    return value[2:] if value.startswith("0x") else value


def read_sysfs(root: str = "/sys/bus/pci/devices") -> list[PciDevice]:
    """Read PCI functions from sysfs (``vendor``, ``device``, ``class`` of every function)."""
    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        raise GpuDetectionError(f"cannot list {root}: {exc}") from exc
    devices = []
    for entry in entries:
        base = os.path.join(root, entry)
        try:
            vendor = _read_hex(os.path.join(base, "vendor"))
            device = _read_hex(os.path.join(base, "device"))
            pci_class = _read_hex(os.path.join(base, "class"))
        except OSError:
            continue
        devices.append(
            PciDevice(
                address=normalize_address(entry),
                vendor_id=vendor[-4:],
                device_id=device[-4:],
                class_id=pci_class[:4].rjust(4, "0") if len(pci_class) >= 4 else pci_class,
            )
        )
    return devices


def count_proc_nvswitches(proc_dir: str = "/proc/driver/nvidia-nvswitch") -> int:
    """Number of NVSwitches the loaded NVSwitch driver reports (0 when the driver is absent)."""
    devices_dir = os.path.join(proc_dir, "devices")
    try:
        return len([name for name in os.listdir(devices_dir) if not name.startswith(".")])
    except OSError:
        return 0


def is_nvidia_gpu(device: PciDevice) -> bool:
    return device.vendor_id == NVIDIA_VENDOR_ID and device.class_id.startswith(GPU_CLASS_PREFIX)


def is_nvswitch(device: PciDevice) -> bool:
    if device.vendor_id != NVIDIA_VENDOR_ID or device.class_id.startswith(GPU_CLASS_PREFIX):
        return False
    return device.device_id in NVSWITCH_DEVICE_IDS or "nvswitch" in device.description.lower()


def architecture_of(device_id: str, description: str = "") -> str:
    """Architecture of an NVIDIA GPU: known id, then chip code name, then id range."""
    device_id = device_id.lower()
    if device_id in KNOWN_GPUS:
        return KNOWN_GPUS[device_id][1]
    match = _CODE_NAME.search(description)
    if match:
        return CODE_NAME_ARCHITECTURE[match.group(1)]
    value = int(device_id, 16)
    for low, high, architecture in DEVICE_ID_RANGES:
        if low <= value <= high:
            return architecture
    return "unknown"


def gpu_name(device_id: str, description: str = "") -> str:
    """Human name: the known-id table (stable across pci.ids versions), else the bracketed
    model lspci prints, else the chip code name, else the id."""
    if device_id in KNOWN_GPUS:
        return KNOWN_GPUS[device_id][0]
    match = _MODEL_NAME.search(description)
    if match:
        return match.group(1).strip()
    code = _CODE_NAME.search(description)
    if code:
        return code.group(0)
    return f"NVIDIA GPU [{NVIDIA_VENDOR_ID}:{device_id}]"


def open_modules_supported(architecture: str) -> bool:
    return architecture in OPEN_MODULES_SUPPORTED


def select_kernel_modules(architectures: list[str]) -> tuple[str | None, list[str]]:
    """Kernel module flavour for a set of GPU architectures, with the reasons it has none.

    Returns (``"open"`` | ``"proprietary"`` | ``None``, problems).
    """
    present = set(architectures)
    if not present:
        return None, []
    problems = []
    unknown = sorted(present - set(ARCHITECTURES))
    if unknown:
        problems.append(f"unrecognised GPU architecture: {', '.join(unknown)}")
    legacy = sorted(a for a in present if a in ARCHITECTURES and a not in OPEN_MODULES_SUPPORTED)
    need_open = sorted(present & OPEN_MODULES_REQUIRED)
    if legacy and need_open:
        problems.append(
            f"{', '.join(need_open)} GPUs need the open kernel modules, which do not drive "
            f"{', '.join(legacy)} GPUs; one host cannot run both"
        )
        return None, problems
    if legacy:
        return "proprietary", problems
    return "open", problems


def fabric_manager_reason(gpus: list[dict], nvswitch_count: int) -> str | None:
    """Why Fabric Manager is required, or None when it is not."""
    if not gpus:
        return None
    if nvswitch_count:
        return f"{nvswitch_count} NVSwitch device(s) found"
    baseboard = [gpu for gpu in gpus if gpu["device_id"] in HGX_NVLINK_BASEBOARD_GPUS]
    if len(baseboard) > 1:
        return f"{len(baseboard)} {baseboard[0]['name']} GPUs on an HGX NVLink baseboard"
    return None


def build_facts(
    devices: list[PciDevice], proc_nvswitch_count: int = 0, source: str = "lspci"
) -> dict:
    """The ``servekit_gpu`` fact for a list of PCI functions."""
    gpus = []
    for device in sorted(devices, key=lambda d: d.address):
        if not is_nvidia_gpu(device):
            continue
        architecture = architecture_of(device.device_id, device.description)
        gpus.append(
            {
                "pci_address": device.address,
                "device_id": device.device_id,
                "pci_id": f"{device.vendor_id}:{device.device_id}",
                "name": gpu_name(device.device_id, device.description),
                "architecture": architecture,
                "open_modules_supported": open_modules_supported(architecture),
            }
        )
    pci_nvswitches = sorted(d.address for d in devices if is_nvswitch(d))
    nvswitch_count = max(len(pci_nvswitches), proc_nvswitch_count)
    architectures = sorted(
        {gpu["architecture"] for gpu in gpus},
        key=lambda a: ARCHITECTURES.index(a) if a in ARCHITECTURES else len(ARCHITECTURES),
    )
    kernel_modules, problems = select_kernel_modules(architectures)
    reason = fabric_manager_reason(gpus, nvswitch_count)
    branch_limits = [LAST_DRIVER_BRANCH[a] for a in architectures if a in LAST_DRIVER_BRANCH]
    return {
        "count": len(gpus),
        "gpus": gpus,
        "models": sorted({gpu["name"] for gpu in gpus}),
        "architectures": architectures,
        "nvswitch_count": nvswitch_count,
        "nvswitch_pci_addresses": pci_nvswitches,
        "fabric_manager_required": reason is not None,
        "fabric_manager_reason": reason,
        "kernel_modules": kernel_modules,
        "open_modules_required": bool(set(architectures) & OPEN_MODULES_REQUIRED),
        "max_driver_branch": min(branch_limits) if branch_limits else None,
        "problems": problems,
        "source": source,
    }


def detect(
    lspci_output: str | None = None,
    lspci_runner=None,
    sysfs_root: str = "/sys/bus/pci/devices",
    nvswitch_proc_dir: str = "/proc/driver/nvidia-nvswitch",
) -> dict:
    """Detect GPUs: recorded text, else ``lspci_runner()`` (returns text or None), else sysfs.

    A recorded profile describes another machine, so the local NVSwitch driver is not consulted.
    """
    if lspci_output is not None:
        return build_facts(parse_lspci(lspci_output), 0, "recorded")
    proc_count = count_proc_nvswitches(nvswitch_proc_dir)
    if lspci_runner is not None:
        text = lspci_runner()
        if text is not None:
            return build_facts(parse_lspci(text), proc_count, "lspci")
    return build_facts(read_sysfs(sysfs_root), proc_count, "sysfs")

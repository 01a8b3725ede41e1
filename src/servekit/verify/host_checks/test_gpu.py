"""GPU host checks: the pinned driver drives every GPU on the PCI bus, persistence mode,
Fabric Manager on NVSwitch systems, the pinned container toolkit, and a container that sees
the GPUs. Skipped (and reported as skips) on hosts whose `servekit_accelerator` is not gpu.

GPUs are counted on the PCI bus with the same detection the roles use
(ansible/module_utils/servekit_gpu.py), from `lspci -nn -D` or, without lspci, sysfs.
"""

from __future__ import annotations

import json
import re

import pytest
import servekit_gpu  # ansible/module_utils, on pytest's pythonpath (pyproject.toml)

from servekit.verify.host_facts import gpu_args_of, journal

SMI_QUERY = "driver_version,pci.bus_id,name,persistence_mode"
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
DAEMON_JSON = "/etc/docker/daemon.json"
# vendor, device and class of every PCI function, for hosts without lspci
SYSFS_LIST = (
    "for d in /sys/bus/pci/devices/*; do "
    'echo "${d##*/} $(cat $d/vendor) $(cat $d/device) $(cat $d/class)"; done'
)


@pytest.fixture(scope="module", autouse=True)
def gpu_host(hostvars):
    # vllm_service_accelerator defaults to servekit_accelerator; a plain value overrides it
    name = "vllm_service_accelerator" if "vllm_service_accelerator" in hostvars else None
    name = name or "servekit_accelerator"
    accelerator = hostvars.get(name, "gpu")
    if accelerator != "gpu":
        pytest.skip(f"{name} is {accelerator!r}: not a GPU host, no GPU checks")


@pytest.fixture(scope="module")
def pci_facts(host) -> dict:
    """The roles' `servekit_gpu` fact, computed from this host's PCI bus now."""
    nvswitch_proc = host.run("ls -1 /proc/driver/nvidia-nvswitch/devices 2>/dev/null")
    proc_count = len(nvswitch_proc.stdout.split()) if nvswitch_proc.rc == 0 else 0
    if host.exists("lspci"):
        result = host.run("lspci -nn -D")
        assert result.rc == 0, f"lspci -nn -D failed: {result.stderr}"
        devices = servekit_gpu.parse_lspci(result.stdout)
        source = "lspci -nn -D"
    else:
        result = host.run(SYSFS_LIST)
        devices = []
        for line in result.stdout.splitlines():
            address, vendor, device, pci_class = [*line.split(), "", "", "", ""][:4]
            hexes = [v.lower().removeprefix("0x") for v in (vendor, device, pci_class)]
            if all(hexes):
                devices.append(
                    servekit_gpu.PciDevice(
                        address=servekit_gpu.normalize_address(address),
                        vendor_id=hexes[0][-4:],
                        device_id=hexes[1][-4:],
                        class_id=hexes[2][:4],
                    )
                )
        source = "sysfs"
    facts = servekit_gpu.build_facts(devices, proc_count, source)
    assert facts["count"] > 0, (
        f"expected NVIDIA GPUs (vendor 10de, class 03xx) on the PCI bus ({source}), got none: "
        "is this a GPU host? set servekit_accelerator: cpu otherwise"
    )
    return facts


@pytest.fixture(scope="module")
def smi_gpus(host) -> list[dict]:
    result = host.run("nvidia-smi --query-gpu=%s --format=csv,noheader", SMI_QUERY)
    assert result.rc == 0, (
        f"expected nvidia-smi to answer, got rc {result.rc}: {result.stderr or result.stdout}"
        " (see `dmesg | grep -i nvrm`)"
    )
    keys = SMI_QUERY.split(",")
    return [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in result.stdout.splitlines()
        if line.strip()
    ]


def test_driver_version_is_pinned(host, hostvars, smi_gpus):
    expected = str(hostvars["nvidia_driver_version"])
    versions = sorted({g["driver_version"] for g in smi_gpus})
    assert versions == [expected], (
        f"expected driver {expected} (nvidia_driver_version), got {', '.join(versions)}"
    )
    loaded = host.run("cat /proc/driver/nvidia/version").stdout
    assert expected in loaded, (
        f"expected the loaded kernel module to be {expected}, got: {loaded.strip()[:300]} "
        "(a driver update without a reboot?)"
    )


def test_nvidia_smi_sees_every_gpu_on_the_pci_bus(smi_gpus, pci_facts):
    seen = len(smi_gpus)
    expected = pci_facts["count"]
    on_bus = [g["pci_address"] for g in pci_facts["gpus"]]
    assert seen == expected, (
        f"expected nvidia-smi to list the {expected} GPU(s) on the PCI bus "
        f"({pci_facts['source']}: {', '.join(on_bus)}), got {seen}: "
        + "; ".join(g.get("pci.bus_id", "?") for g in smi_gpus)
        + " (a GPU on the bus but not in nvidia-smi failed to initialise: dmesg | grep -i nvrm)"
    )


def test_persistence_mode_is_on(hostvars, smi_gpus):
    if not hostvars.get("nvidia_driver_persistence_mode", True):
        pytest.skip("nvidia_driver_persistence_mode is false")
    off = [
        f"{g['pci.bus_id']}: {g['persistence_mode']}"
        for g in smi_gpus
        if g["persistence_mode"] != "Enabled"
    ]
    assert not off, f"expected persistence mode Enabled on every GPU, got {off}"


def test_fabric_manager_is_active_where_nvswitches_exist(host, hostvars, pci_facts):
    mode = str(hostvars.get("nvidia_driver_fabric_manager", "auto"))
    if mode == "auto":
        required, why = pci_facts["fabric_manager_required"], pci_facts["fabric_manager_reason"]
    else:
        required, why = mode == "enabled", f"nvidia_driver_fabric_manager is {mode}"
    if not required:
        pytest.skip(f"Fabric Manager not needed ({why or 'no NVSwitch found'})")
    fm = host.service("nvidia-fabricmanager")
    assert fm.is_running, (
        f"expected nvidia-fabricmanager active ({why}), it is not; journal:\n"
        + journal(host, "nvidia-fabricmanager")
    )
    assert fm.is_enabled, f"expected nvidia-fabricmanager enabled ({why}), it is not"


def test_container_toolkit_version_is_pinned(host, hostvars):
    expected = str(hostvars["nvidia_container_toolkit_version"])
    result = host.run("nvidia-ctk --version")
    assert result.rc == 0, f"expected nvidia-ctk to run, got rc {result.rc}: {result.stderr}"
    match = re.search(r"version\s+v?(\S+)", result.stdout)
    got = match.group(1) if match else result.stdout.strip()[:120]
    assert got == expected, f"expected NVIDIA Container Toolkit {expected}, got {got}"


def _cdi_specs(host) -> list[str]:
    """CDI spec files that name NVIDIA GPU devices."""
    globs = " ".join(f"{d}/*.yaml {d}/*.json" for d in CDI_DIRS)
    return host.run(f"grep -ls 'nvidia.com/gpu' {globs}").stdout.split()


def test_docker_gets_gpus_through_the_nvidia_runtime_or_cdi(host, docker_run_args):
    daemon = host.file(DAEMON_JSON)
    runtimes = {}
    if daemon.exists:
        try:
            runtimes = json.loads(daemon.content_string).get("runtimes") or {}
        except ValueError as exc:
            pytest.fail(f"expected {DAEMON_JSON} to be JSON, got {exc}")
    specs = _cdi_specs(host)
    assert "nvidia" in runtimes or specs, (
        f"expected the nvidia runtime in {DAEMON_JSON} (runtimes: {sorted(runtimes)}) "
        f"or a CDI spec naming nvidia.com/gpu under {' or '.join(CDI_DIRS)}, got neither"
    )
    gpu_args = gpu_args_of(docker_run_args)
    if any(a.startswith("nvidia.com/") for a in gpu_args):
        assert specs, (
            f"expected a CDI spec under {' or '.join(CDI_DIRS)}: vllm.service asks for "
            f"{' '.join(gpu_args)}, got none"
        )


def test_a_container_sees_every_gpu(host, docker_run_args, unit_image, pci_facts):
    present = host.run("docker image inspect --format '{{.Id}}' %s", unit_image)
    assert present.rc == 0, (
        f"expected the vLLM image {unit_image} on the host (nothing else is pulled), "
        f"got: {present.stderr.strip()}"
    )
    gpu_args = gpu_args_of(docker_run_args) or ["--gpus", "all"]
    words = ["docker", "run", "--rm", "--pull", "never", *gpu_args]
    words += ["--entrypoint", "nvidia-smi", unit_image, "-L"]
    result = host.run(" ".join(["%s"] * len(words)), *words)
    listed = [line for line in result.stdout.splitlines() if re.match(r"^GPU \d+:", line)]
    assert result.rc == 0 and len(listed) == pci_facts["count"], (
        f"expected `{' '.join(words)}` to list the host's {pci_facts['count']} GPU(s), "
        f"got rc {result.rc} and {len(listed)}: {(result.stdout + result.stderr).strip()[:600]}"
    )

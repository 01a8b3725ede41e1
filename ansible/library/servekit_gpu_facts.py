#!/usr/bin/python
"""Ansible module: detect NVIDIA GPUs and NVSwitches from PCI data (no driver needed)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: servekit_gpu_facts
short_description: Detect NVIDIA GPUs and NVSwitches from PCI data
description:
  - Reads C(lspci -nn -D) when lspci is installed, else the C(vendor), C(device) and C(class)
    files under C(/sys/bus/pci/devices), or parses a recorded C(lspci -nn) output instead of
    probing the host.
  - Works before any NVIDIA driver is installed. Never changes the host; supports check mode.
  - Sets the C(servekit_gpu) fact with the GPU count, models, PCI ids, architectures, NVSwitch
    count, whether Fabric Manager is required and which kernel module flavour (open or
    proprietary) drives the GPUs.
options:
  lspci_output:
    description:
      - Recorded C(lspci -nn) text to use instead of probing the host (planning and tests).
    type: str
    required: false
  nvswitch_proc_dir:
    description:
      - Directory of the NVSwitch driver; its C(devices) entries count NVSwitches when the driver
        is loaded. Ignored with I(lspci_output).
    type: path
    default: /proc/driver/nvidia-nvswitch
  sysfs_pci_dir:
    description:
      - PCI device directory read when lspci is not installed.
    type: path
    default: /sys/bus/pci/devices
author:
  - servekit
"""

EXAMPLES = r"""
- name: Detect GPUs
  servekit_gpu_facts:

- name: Plan against a recorded hardware profile
  servekit_gpu_facts:
    lspci_output: "{{ lookup('ansible.builtin.file', 'h100_sxm_hgx.lspci') }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts to add to ansible_facts.
  returned: always
  type: dict
  contains:
    servekit_gpu:
      description: Detected NVIDIA GPUs.
      type: dict
      contains:
        count:
          description: Number of NVIDIA GPUs (PCI class 03xx).
          type: int
        gpus:
          description: One entry per GPU with pci_address, device_id, pci_id, name,
            architecture and open_modules_supported.
          type: list
          elements: dict
        models:
          description: Distinct GPU model names.
          type: list
          elements: str
        architectures:
          description: Distinct architectures, oldest first.
          type: list
          elements: str
        nvswitch_count:
          description: NVSwitches found on PCI or reported by the NVSwitch driver.
          type: int
        fabric_manager_required:
          description: Whether NVIDIA Fabric Manager must run on this host.
          type: bool
        fabric_manager_reason:
          description: Why Fabric Manager is required, or null.
          type: str
        kernel_modules:
          description: C(open), C(proprietary), or null without GPUs or when no single flavour fits.
          type: str
        open_modules_required:
          description: A GPU is supported by the open kernel modules only (Blackwell and newer).
          type: bool
        max_driver_branch:
          description: Newest driver branch that still supports every GPU, or null for no limit.
          type: int
        problems:
          description: Reasons no driver configuration fits these GPUs.
          type: list
          elements: str
        source:
          description: C(lspci), C(sysfs) or C(recorded).
          type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible.module_utils.servekit_gpu import GpuDetectionError, detect


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "lspci_output": {"type": "str", "required": False},
            "nvswitch_proc_dir": {"type": "path", "default": "/proc/driver/nvidia-nvswitch"},
            "sysfs_pci_dir": {"type": "path", "default": "/sys/bus/pci/devices"},
        },
        supports_check_mode=True,
    )

    def run_lspci():
        lspci = module.get_bin_path("lspci")
        if lspci is None:
            return None
        rc, out, err = module.run_command([lspci, "-nn", "-D"], environ_update={"LC_ALL": "C"})
        if rc != 0:
            module.warn(f"lspci failed (rc={rc}): {err.strip()}; reading sysfs instead")
            return None
        return out

    try:
        facts = detect(
            lspci_output=module.params["lspci_output"],
            lspci_runner=run_lspci,
            sysfs_root=module.params["sysfs_pci_dir"],
            nvswitch_proc_dir=module.params["nvswitch_proc_dir"],
        )
    except GpuDetectionError as exc:
        module.fail_json(msg=f"GPU detection failed: {exc}")
    module.exit_json(changed=False, ansible_facts={"servekit_gpu": facts})


if __name__ == "__main__":
    main()

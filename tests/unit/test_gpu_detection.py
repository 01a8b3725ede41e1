"""GPU detection (ansible/module_utils/servekit_gpu.py) against recorded `lspci -nn` outputs.

The fixtures under tests/fixtures/gpu are `lspci -nn -D` listings of real hardware classes with
the real PCI ids (see the README there). Each test asserts a decision the GPU roles act on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import servekit_gpu as gpu  # ansible/module_utils, on pytest's pythonpath (pyproject.toml)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "gpu"


def facts_for(name: str, proc_nvswitches: int = 0) -> dict:
    text = (FIXTURES / name).read_text()
    return gpu.build_facts(gpu.parse_lspci(text), proc_nvswitches, "recorded")


# --- decisions per hardware class -------------------------------------------------------


def test_h100_hgx_needs_open_modules_and_fabric_manager():
    facts = facts_for("h100_sxm_hgx_nvswitch.lspci")
    assert facts["count"] == 8
    assert facts["models"] == ["H100 SXM5 80GB"]
    assert facts["architectures"] == ["hopper"]
    assert facts["kernel_modules"] == "open"
    assert facts["nvswitch_count"] == 4
    assert facts["fabric_manager_required"] is True
    assert "4 NVSwitch" in facts["fabric_manager_reason"]
    assert facts["max_driver_branch"] is None
    assert facts["problems"] == []
    # lspci printed "Device [10de:2330]" (old pci.ids): the id table still names the GPU.
    assert {g["device_id"] for g in facts["gpus"]} == {"2330"}
    assert facts["gpus"][0]["pci_address"] == "0000:1b:00.0"
    assert facts["gpus"][0]["pci_id"] == "10de:2330"
    assert all(g["open_modules_supported"] for g in facts["gpus"])


def test_h200_hgx_with_named_nvswitches():
    facts = facts_for("h200_sxm_hgx_nvswitch_named.lspci")
    assert facts["count"] == 8
    assert facts["models"] == ["H200 SXM 141GB"]
    assert facts["nvswitch_count"] == 4
    assert facts["fabric_manager_required"] is True
    assert facts["kernel_modules"] == "open"


def test_a100_hgx_lr10_nvswitches_need_fabric_manager():
    facts = facts_for("a100_sxm_hgx_nvswitch.lspci")
    assert facts["count"] == 8
    assert facts["architectures"] == ["ampere"]
    assert facts["nvswitch_count"] == 6
    assert facts["fabric_manager_required"] is True
    assert facts["kernel_modules"] == "open"


def test_b200_hgx_needs_fabric_manager_without_nvswitch_on_pci():
    facts = facts_for("b200_hgx.lspci")
    assert facts["count"] == 8
    assert facts["architectures"] == ["blackwell"]
    assert facts["nvswitch_count"] == 0
    assert facts["fabric_manager_required"] is True
    assert "HGX NVLink baseboard" in facts["fabric_manager_reason"]
    assert facts["open_modules_required"] is True
    assert facts["kernel_modules"] == "open"


def test_l40s_pcie_needs_no_fabric_manager():
    facts = facts_for("l40s_x4.lspci")
    assert facts["count"] == 4
    assert facts["models"] == ["L40S"]
    assert facts["architectures"] == ["ada"]
    assert facts["kernel_modules"] == "open"
    assert facts["fabric_manager_required"] is False
    assert facts["fabric_manager_reason"] is None


def test_a10_single_gpu():
    facts = facts_for("a10_x1.lspci")
    assert (facts["count"], facts["models"], facts["architectures"]) == (1, ["A10"], ["ampere"])
    assert facts["kernel_modules"] == "open"
    assert facts["fabric_manager_required"] is False


def test_t4_turing_is_the_oldest_open_module_gpu():
    facts = facts_for("t4_x1_cloud_vm.lspci")
    assert (facts["count"], facts["models"]) == (1, ["Tesla T4"])
    assert facts["architectures"] == ["turing"]
    assert facts["kernel_modules"] == "open"
    assert facts["gpus"][0]["pci_address"] == "0000:00:04.0"


def test_pascal_p100_needs_proprietary_modules_and_at_most_r580():
    facts = facts_for("p100_x2.lspci")
    assert facts["count"] == 2  # the Matrox BMC VGA is not an NVIDIA GPU
    assert facts["models"] == ["Tesla P100 PCIe 16GB"]
    assert facts["architectures"] == ["pascal"]
    assert facts["kernel_modules"] == "proprietary"
    assert not any(g["open_modules_supported"] for g in facts["gpus"])
    assert facts["max_driver_branch"] == 580
    assert facts["fabric_manager_required"] is False


def test_volta_v100_needs_proprietary_modules():
    facts = facts_for("v100_x4.lspci")
    assert facts["count"] == 4
    assert facts["architectures"] == ["volta"]
    assert facts["kernel_modules"] == "proprietary"
    assert facts["max_driver_branch"] == 580


def test_no_gpu_host():
    facts = facts_for("no_gpu.lspci")
    assert facts["count"] == 0
    assert facts["gpus"] == []
    assert facts["kernel_modules"] is None
    assert facts["fabric_manager_required"] is False
    assert facts["problems"] == []


def test_workstation_without_domain_and_audio_function():
    facts = facts_for("rtx4090_workstation_no_domain.lspci")
    # The HDMI audio function (class 0403) of the card is not a GPU.
    assert facts["count"] == 1
    assert facts["gpus"][0]["pci_address"] == "0000:01:00.0"
    assert facts["gpus"][0]["name"] == "GeForce RTX 4090"
    assert facts["architectures"] == ["ada"]


# --- mixed hosts and edge cases ---------------------------------------------------------

LINE = "0000:{bus}:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:{dev}] (rev a1)\n"


def test_mixed_turing_and_volta_use_proprietary_modules():
    text = LINE.format(bus="17", dev="1eb8") + LINE.format(bus="18", dev="1db4")
    facts = gpu.build_facts(gpu.parse_lspci(text))
    assert facts["architectures"] == ["volta", "turing"]
    assert facts["kernel_modules"] == "proprietary"
    assert facts["problems"] == []


def test_blackwell_with_pascal_has_no_driver_configuration():
    text = LINE.format(bus="17", dev="2901") + LINE.format(bus="18", dev="15f8")
    facts = gpu.build_facts(gpu.parse_lspci(text))
    assert facts["kernel_modules"] is None
    assert len(facts["problems"]) == 1
    assert "blackwell" in facts["problems"][0] and "pascal" in facts["problems"][0]


def test_single_b200_is_not_an_nvlink_baseboard():
    facts = gpu.build_facts(gpu.parse_lspci(LINE.format(bus="17", dev="2901")))
    assert facts["fabric_manager_required"] is False


def test_nvswitch_driver_entries_count_when_not_on_pci(tmp_path):
    devices = tmp_path / "devices"
    devices.mkdir()
    for address in ("0000:05:00.0", "0000:06:00.0"):
        (devices / address).mkdir()
    assert gpu.count_proc_nvswitches(str(tmp_path)) == 2
    assert gpu.count_proc_nvswitches(str(tmp_path / "absent")) == 0
    text = LINE.format(bus="1b", dev="2330")
    facts = gpu.build_facts(gpu.parse_lspci(text), proc_nvswitch_count=2)
    assert facts["nvswitch_count"] == 2
    assert facts["fabric_manager_required"] is True


@pytest.mark.parametrize(
    ("device_id", "description", "expected"),
    [
        ("2330", "", "hopper"),  # known id
        ("26b9", "", "ada"),
        ("1eb8", "", "turing"),
        ("15f8", "", "pascal"),
        ("1db4", "", "volta"),
        ("2236", "", "ampere"),
        ("2684", "AD102 [GeForce RTX 4090]", "ada"),  # chip code name
        ("20b7", "", "ampere"),  # id range only (A30)
        ("2bb1", "", "blackwell"),
        ("1e30", "", "turing"),
        ("13bb", "", "maxwell"),
        ("1b80", "", "pascal"),
        ("3182", "", "blackwell"),
        ("3021", "", "rubin"),
        ("1180", "", "kepler"),
    ],
)
def test_architecture_of(device_id, description, expected):
    assert gpu.architecture_of(device_id, description) == expected


def test_kepler_is_not_supported_by_open_modules_or_r580():
    facts = gpu.build_facts(gpu.parse_lspci(LINE.format(bus="03", dev="1180")))
    assert facts["kernel_modules"] == "proprietary"
    assert facts["max_driver_branch"] == 470


def test_parse_rejects_output_without_ids():
    with pytest.raises(gpu.GpuDetectionError):
        gpu.parse_lspci("01:00.0 VGA compatible controller: NVIDIA Corporation AD102\n")


def test_parse_ignores_verbose_detail_lines():
    text = (
        "0000:17:00.0 3D controller [0302]: NVIDIA Corporation AD102GL [L40S] [10de:26b9]\n"
        "\tSubsystem: NVIDIA Corporation AD102GL [L40S] [10de:1851]\n"
        "\tKernel driver in use: nvidia\n"
    )
    devices = gpu.parse_lspci(text)
    assert [(d.address, d.device_id, d.class_id) for d in devices] == [
        ("0000:17:00.0", "26b9", "0302")
    ]


# --- sysfs, the fallback when lspci is not installed ------------------------------------


def make_sysfs(root: Path, functions: dict[str, tuple[str, str, str]]) -> None:
    for address, (vendor, device, pci_class) in functions.items():
        node = root / address
        node.mkdir(parents=True)
        (node / "vendor").write_text(vendor + "\n")
        (node / "device").write_text(device + "\n")
        (node / "class").write_text(pci_class + "\n")


def test_sysfs_h100_with_nvswitches(tmp_path):
    functions = {
        "0000:00:00.0": ("0x8086", "0x09a2", "0x060000"),
        "0000:04:00.0": ("0x1a03", "0x2000", "0x030000"),  # ASPEED BMC VGA
        "0000:05:00.0": ("0x10de", "0x22a3", "0x068000"),  # NVSwitch
        "0000:06:00.0": ("0x10de", "0x22a3", "0x068000"),
        "0000:1b:00.0": ("0x10de", "0x2330", "0x030200"),
        "0000:43:00.0": ("0x10de", "0x2330", "0x030200"),
    }
    make_sysfs(tmp_path, functions)
    facts = gpu.detect(
        lspci_runner=lambda: None,
        sysfs_root=str(tmp_path),
        nvswitch_proc_dir=str(tmp_path / "no-proc"),
    )
    assert facts["source"] == "sysfs"
    assert facts["count"] == 2
    assert facts["models"] == ["H100 SXM5 80GB"]
    assert facts["nvswitch_count"] == 2
    assert facts["fabric_manager_required"] is True
    assert facts["kernel_modules"] == "open"


def test_detect_prefers_lspci_and_recorded_text(tmp_path):
    text = (FIXTURES / "t4_x1_cloud_vm.lspci").read_text()
    from_runner = gpu.detect(lspci_runner=lambda: text, nvswitch_proc_dir=str(tmp_path))
    assert from_runner["source"] == "lspci"
    recorded = gpu.detect(lspci_output=text)
    assert recorded["source"] == "recorded"
    assert recorded["count"] == from_runner["count"] == 1


# --- the Ansible module around it -------------------------------------------------------


def test_module_reports_facts_without_changing_anything(tmp_path):
    """Runs the real module through Ansible (local, check mode) with a recorded profile."""
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        pytest.skip("ansible is not installed in this environment")
    profile = FIXTURES / "h100_sxm_hgx_nvswitch.lspci"
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible" / "ansible.cfg"),
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_CALLBACKS_ENABLED="ansible.builtin.tree",
        ANSIBLE_CALLBACK_TREE_DIR=str(tmp_path),
    )
    result = subprocess.run(
        [
            str(ansible),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "--check",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-m",
            "servekit_gpu_facts",
            "-a",
            f"lspci_output={{{{ lookup('file', '{profile}') }}}}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT / "ansible",
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    host = json.loads((tmp_path / "localhost").read_text())
    assert host["changed"] is False
    facts = host["ansible_facts"]["servekit_gpu"]
    assert facts["count"] == 8
    assert facts["source"] == "recorded"
    assert facts["kernel_modules"] == "open"
    assert facts["fabric_manager_required"] is True

"""The GPU roles' decisions, templates, argument specs and output filters, without a GPU.

Role variables are evaluated with Ansible's own templating from the roles' defaults and vars
files, for a recorded hardware profile and an OS, so the tests check what the roles would
install; templates are rendered the way the template module renders them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import servekit_gpu as gpu  # ansible/module_utils, on pytest's pythonpath (pyproject.toml)
import servekit_nvidia  # ansible/plugins/filter, likewise
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"
FIXTURES = ROOT / "tests" / "fixtures" / "gpu"

LOADER = DataLoader()
CUDA_REPOS = "https://developer.download.nvidia.com/compute/cuda/repos"

OS_FACTS = {
    "ubuntu2204": {
        "distribution": "Ubuntu",
        "distribution_version": "22.04",
        "distribution_major_version": "22",
        "os_family": "Debian",
        "kernel": "5.15.0-131-generic",
    },
    "ubuntu2404": {
        "distribution": "Ubuntu",
        "distribution_version": "24.04",
        "distribution_major_version": "24",
        "os_family": "Debian",
        "kernel": "6.8.0-51-generic",
    },
    "debian12": {
        "distribution": "Debian",
        "distribution_version": "12.8",
        "distribution_major_version": "12",
        "os_family": "Debian",
        "kernel": "6.1.0-28-amd64",
    },
    "rocky9": {
        "distribution": "Rocky",
        "distribution_version": "9.5",
        "distribution_major_version": "9",
        "os_family": "RedHat",
        "kernel": "5.14.0-503.14.1.el9_5.x86_64",
    },
    "rhel9": {
        "distribution": "RedHat",
        "distribution_version": "9.5",
        "distribution_major_version": "9",
        "os_family": "RedHat",
        "kernel": "5.14.0-503.14.1.el9_5.x86_64",
    },
}


def gpu_facts(profile: str) -> dict:
    return gpu.build_facts(gpu.parse_lspci((FIXTURES / profile).read_text()), 0, "recorded")


def load(path: Path) -> dict:
    return LOADER.load_from_file(str(path), trusted_as_template=True) or {}


def os_vars(role: str, facts: dict) -> dict:
    candidates = [
        f"{facts['distribution']}-{facts['distribution_version']}.yml",
        f"{facts['distribution']}-{facts['distribution_major_version']}.yml",
        f"{facts['distribution']}.yml",
        f"{facts['os_family']}.yml",
    ]
    for name in candidates:
        path = ROLES / role / "vars" / name
        if path.exists():
            return load(path)
    raise AssertionError(f"no vars file for {facts}")


class Role:
    """A role's variables as a play would see them (defaults < vars/main < OS vars < extra)."""

    def __init__(self, role, os_name, profile=None, arch="x86_64", check_mode=False, **extra):
        facts = dict(OS_FACTS[os_name], architecture=arch)
        if profile:
            facts["servekit_gpu"] = gpu_facts(profile)
        variables = {}
        variables.update(load(ROLES / role / "defaults" / "main.yml"))
        variables.update(load(ROLES / role / "vars" / "main.yml"))
        variables.update(os_vars(role, facts))
        variables.update(
            ansible_facts=facts,
            ansible_check_mode=check_mode,
            ansible_managed="Ansible managed",
            inventory_hostname="gpu-1",
        )
        variables.update(extra)
        self.templar = Templar(loader=LOADER, variables=variables)
        self.role = role

    def __getitem__(self, name: str):
        return self.eval(name)

    def eval(self, expression: str):
        return self.templar.template(trust_as_template("{{ " + expression + " }}"))

    def render(self, template: str) -> str:
        source = (ROLES / self.role / "templates" / template).read_text()
        overrides = {"trim_blocks": True, "lstrip_blocks": False, "newline_sequence": "\n"}
        return self.templar.template(
            trust_as_template(source), escape_backslashes=False, overrides=overrides
        )


def driver(os_name, profile, **extra) -> Role:
    return Role("nvidia_driver", os_name, profile, **extra)


def toolkit(os_name, profile="h100_sxm_hgx_nvswitch.lspci", **extra) -> Role:
    return Role("nvidia_container_toolkit", os_name, profile, **extra)


# --- nvidia_driver: what gets installed ----------------------------------------------------


def test_h100_on_ubuntu_installs_open_headless_driver_and_fabric_manager():
    role = driver("ubuntu2204", "h100_sxm_hgx_nvswitch.lspci")
    assert role["_nvidia_driver_flavour"] == "open"
    assert role["_nvidia_driver_package_specs"] == [
        "nvidia-headless-580-open=580.126.20-*",
        "nvidia-utils-580=580.126.20-*",
    ]
    assert role["_nvidia_driver_fm_package_specs"] == ["nvidia-fabricmanager=580.126.20-*"]
    assert role["_nvidia_driver_services"] == ["nvidia-persistenced", "nvidia-fabricmanager"]
    assert role["_nvidia_driver_pinned_names"] == [
        "nvidia-headless-580-open",
        "nvidia-utils-580",
        "nvidia-fabricmanager",
    ]
    assert role["_nvidia_driver_all_kernel_packages"] == [
        "linux-headers-5.15.0-131-generic",
        "dkms",
        "linux-headers-generic",
    ]
    assert (
        role["nvidia_driver_repo_url"]
        == "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64"
    )
    assert role["nvidia_driver_repo_key_url"].endswith("/ubuntu2204/x86_64/3bf863cc.pub")


def test_pascal_on_debian_installs_proprietary_driver_without_fabric_manager():
    role = driver("debian12", "p100_x2.lspci")
    assert role["_nvidia_driver_flavour"] == "proprietary"
    assert role["_nvidia_driver_package_specs"] == [
        "nvidia-driver-cuda=580.126.20-*",
        "nvidia-kernel-dkms=580.126.20-*",
        "nvidia-persistenced=580.126.20-*",
    ]
    assert role["_nvidia_driver_fm_package_specs"] == []
    assert role["_nvidia_driver_services"] == ["nvidia-persistenced"]
    assert role["_nvidia_driver_all_kernel_packages"] == [
        "linux-headers-6.1.0-28-amd64",
        "dkms",
        "linux-headers-amd64",
    ]
    assert role["nvidia_driver_repo_url"].endswith("/repos/debian12/x86_64")


def test_b200_on_ubuntu_2404_adds_the_nvlink_subnet_manager():
    role = driver("ubuntu2404", "b200_hgx.lspci")
    assert role["_nvidia_driver_flavour"] == "open"
    assert role["_nvidia_driver_fm_package_specs"] == [
        "nvidia-fabricmanager=580.126.20-*",
        "nvlsm",
    ]
    assert role["_nvidia_driver_services"] == ["nvidia-persistenced", "nvidia-fabricmanager"]
    assert role["nvidia_driver_repo_url"].endswith("/repos/ubuntu2404/x86_64")


def test_l40s_on_rocky_uses_dnf_specs_module_stream_and_epel():
    role = driver("rocky9", "l40s_x4.lspci")
    assert role["_nvidia_driver_pkg_mgr"] == "dnf"
    assert role["_nvidia_driver_package_specs"] == [
        "nvidia-driver-cuda-580.126.20",
        "kmod-nvidia-open-dkms-580.126.20",
    ]
    assert role["_nvidia_driver_dnf_module"] == "nvidia-driver:580-open"
    assert role["_nvidia_driver_fm_package_specs"] == []
    assert role["_nvidia_driver_all_kernel_packages"] == [
        "kernel-devel-5.14.0-503.14.1.el9_5.x86_64",
        "dkms",
        "kernel-devel",
    ]
    assert role["nvidia_driver_repo_url"].endswith("/repos/rhel9/x86_64")
    assert role["nvidia_driver_repo_key_url"].endswith("/D42D0685.pub")
    assert role["nvidia_driver_epel_repo_url"].startswith(
        "https://dl.fedoraproject.org/pub/epel/9/"
    )


def test_v100_on_rhel_uses_the_proprietary_stream():
    role = driver("rhel9", "v100_x4.lspci")
    assert role["_nvidia_driver_dnf_module"] == "nvidia-driver:580-dkms"
    assert role["_nvidia_driver_packages"] == ["nvidia-driver-cuda", "kmod-nvidia-latest-dkms"]


def test_overrides_win_over_detection():
    role = driver(
        "ubuntu2204",
        "h100_sxm_hgx_nvswitch.lspci",
        nvidia_driver_kernel_modules="proprietary",
        nvidia_driver_fabric_manager="disabled",
    )
    assert role["_nvidia_driver_packages"] == ["nvidia-headless-580", "nvidia-utils-580"]
    assert role["_nvidia_driver_fm_package_specs"] == []
    assert role["_nvidia_driver_services"] == ["nvidia-persistenced"]
    forced = driver("ubuntu2204", "l40s_x4.lspci", nvidia_driver_fabric_manager="enabled")
    assert forced["_nvidia_driver_fm_package_specs"] == ["nvidia-fabricmanager=580.126.20-*"]


def test_older_branch_uses_the_branch_named_fabric_manager_package():
    role = driver(
        "ubuntu2204",
        "h100_sxm_hgx_nvswitch.lspci",
        nvidia_driver_branch="570",
        nvidia_driver_version="570.195.03",
    )
    assert role["_nvidia_driver_fm_package_specs"] == ["nvidia-fabricmanager-570=570.195.03-*"]


def test_arm_servers_use_the_sbsa_repository():
    role = driver("ubuntu2204", "h100_sxm_hgx_nvswitch.lspci", arch="aarch64")
    assert role["nvidia_driver_repo_url"].endswith("/repos/ubuntu2204/sbsa")


def test_air_gapped_mirror_replaces_every_driver_url():
    mirror = "http://mirror.lan/nvidia/cuda/ubuntu2204/x86_64/"
    role = driver("ubuntu2204", "h100_sxm_hgx_nvswitch.lspci", nvidia_driver_repo_url=mirror)
    assert role["nvidia_driver_repo_key_url"] == mirror + "/3bf863cc.pub"
    assert "URIs: http://mirror.lan/nvidia/cuda/ubuntu2204/x86_64/\n" in role.render(
        "nvidia-cuda.sources.j2"
    )


def test_proxy_environment_passes_through():
    proxy = {"https_proxy": "http://proxy.lan:3128", "no_proxy": "localhost"}
    assert driver("debian12", "p100_x2.lspci", servekit_proxy_env=proxy)[
        "nvidia_driver_proxy_env"
    ] == (proxy)
    assert toolkit("debian12", servekit_proxy_env=proxy)["nvidia_container_toolkit_proxy_env"] == (
        proxy
    )
    assert driver("debian12", "p100_x2.lspci")["nvidia_driver_proxy_env"] == {}


@pytest.mark.parametrize(
    ("os_name", "expected"),
    [
        ("ubuntu2204", "Ubuntu-22.04"),
        ("ubuntu2404", "Ubuntu-24.04"),
        ("debian12", "Debian-12"),
        ("rocky9", "Rocky-9"),
        ("rhel9", "RedHat-9"),
    ],
)
def test_supported_operating_systems(os_name, expected):
    role = driver(os_name, "l40s_x4.lspci")
    assert role["_nvidia_driver_os"] == expected
    assert expected in role["_nvidia_driver_supported_os"]


def test_unsupported_os_is_named_in_the_preflight_check():
    role = Role("nvidia_driver", "ubuntu2204", "l40s_x4.lspci")
    role.templar.available_variables = dict(
        role.templar.available_variables,
        ansible_facts=dict(OS_FACTS["ubuntu2204"], distribution_version="20.04"),
    )
    assert role["_nvidia_driver_os"] == "Ubuntu-20.04"
    assert role["_nvidia_driver_os in _nvidia_driver_supported_os"] is False


# --- nvidia_driver: rendered files --------------------------------------------------------


def test_apt_source_is_signed_by_its_own_key():
    text = driver("ubuntu2404", "l40s_x4.lspci").render("nvidia-cuda.sources.j2")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "Types: deb",
        "URIs: https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64/",
        "Suites: /",
        "Signed-By: /etc/apt/keyrings/servekit-nvidia-cuda.asc",
    ]


def test_apt_preferences_pin_every_driver_package_to_the_version():
    text = driver("ubuntu2204", "h100_sxm_hgx_nvswitch.lspci").render("nvidia-driver.pref.j2")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "Package: nvidia-* libnvidia-* xserver-xorg-video-nvidia-*",
        "Pin: version 580.126.20-*",
        "Pin-Priority: 1001",
    ]


def test_yum_repository_with_and_without_epel():
    text = driver("rocky9", "l40s_x4.lspci").render("nvidia-cuda.repo.j2")
    assert "[servekit-nvidia-cuda]" in text
    assert "baseurl=" + CUDA_REPOS + "/rhel9/x86_64/\n" in text
    assert "gpgcheck=1" in text
    # dnf imports the keys from the copies the signing_key role checked, never from the network.
    assert "gpgkey=file:///etc/pki/rpm-gpg/servekit-nvidia-cuda.asc\n" in text
    assert "gpgkey=file:///etc/pki/rpm-gpg/servekit-epel.asc\n" in text
    assert "[servekit-epel]" in text and "includepkgs=dkms" in text
    site = driver("rocky9", "l40s_x4.lspci", nvidia_driver_epel_repo_url="")
    assert "[servekit-epel]" not in site.render("nvidia-cuda.repo.j2")


def test_nouveau_blacklist():
    text = driver("debian12", "p100_x2.lspci").render("blacklist-nouveau.conf.j2")
    assert "\nblacklist nouveau\noptions nouveau modeset=0\n" in text


def test_module_options():
    role = driver(
        "ubuntu2204",
        "l40s_x4.lspci",
        nvidia_driver_module_params={"NVreg_RestrictProfilingToAdminUsers": False, "NVreg_A": 5},
    )
    text = role.render("nvidia.conf.j2")
    assert "\noptions nvidia NVreg_A=5 NVreg_RestrictProfilingToAdminUsers=0\n" in text
    empty = driver("ubuntu2204", "l40s_x4.lspci").render("nvidia.conf.j2")
    assert "options nvidia" not in empty


def test_persistence_daemon_drop_in():
    text = driver("ubuntu2204", "l40s_x4.lspci").render("nvidia-persistenced.conf.j2")
    assert "[Service]\nExecStart=\n" in text
    assert "\nExecStart=/usr/bin/nvidia-persistenced --persistence-mode" in text
    off = driver("ubuntu2204", "l40s_x4.lspci", nvidia_driver_persistence_mode=False)
    assert "--no-persistence-mode" in off.render("nvidia-persistenced.conf.j2")


# --- nvidia_container_toolkit -----------------------------------------------------------


def test_toolkit_packages_and_repository():
    role = toolkit("ubuntu2204")
    assert role["_nvidia_container_toolkit_package_specs"] == [
        "nvidia-container-toolkit=1.19.1-*",
        "nvidia-container-toolkit-base=1.19.1-*",
        "libnvidia-container-tools=1.19.1-*",
        "libnvidia-container1=1.19.1-*",
    ]
    assert (
        role["nvidia_container_toolkit_repo_url"]
        == "https://nvidia.github.io/libnvidia-container/stable/deb/amd64"
    )
    text = role.render("nvidia-container-toolkit.sources.j2")
    assert "URIs: https://nvidia.github.io/libnvidia-container/stable/deb/amd64/\n" in text
    assert "Signed-By: /etc/apt/keyrings/servekit-nvidia-container-toolkit.asc\n" in text


def test_toolkit_on_el_arm():
    role = toolkit("rocky9", arch="aarch64")
    assert role["_nvidia_container_toolkit_package_specs"][0] == "nvidia-container-toolkit-1.19.1"
    text = role.render("nvidia-container-toolkit.repo.j2")
    assert "baseurl=https://nvidia.github.io/libnvidia-container/stable/rpm/aarch64\n" in text
    # NVIDIA signs the RPMs too: both the packages and the metadata are checked, with the local key.
    assert "\ngpgcheck=1\n" in text and "\nrepo_gpgcheck=1\n" in text
    assert "gpgkey=file:///etc/pki/rpm-gpg/servekit-nvidia-container-toolkit.asc\n" in text


def test_cdi_spec_location_follows_the_toolkit_version():
    assert toolkit("debian12")["_nvidia_container_toolkit_cdi_spec"] == "/var/run/cdi/nvidia.yaml"
    old = toolkit("debian12", nvidia_container_toolkit_version="1.17.8")
    assert old["_nvidia_container_toolkit_has_cdi_refresh"] is False
    assert old["_nvidia_container_toolkit_cdi_spec"] == "/etc/cdi/nvidia.yaml"


def test_container_gpu_arguments():
    args = toolkit("debian12")["_nvidia_container_toolkit_gpu_args"]
    assert args == {"cdi": ["--device", "nvidia.com/gpu=all"], "gpus": ["--gpus", "all"]}


def _task(role: str, tasks_file: str, name: str) -> dict:
    tasks = yaml.safe_load((ROLES / role / "tasks" / tasks_file).read_text())
    return next(task for task in tasks if task.get("name") == name)


@pytest.mark.parametrize(
    ("docker", "setting", "expected"),
    [
        ("29.4.3", "auto", "cdi"),
        ("25.0", "auto", "cdi"),
        ("20.10.24", "auto", "gpus"),
        ("none", "auto", "gpus"),
        ("29.4.3", "gpus", "gpus"),
    ],
)
def test_gpu_access_choice(docker, setting, expected):
    task = _task(
        "nvidia_container_toolkit",
        "preflight.yml",
        "Nvidia container toolkit | Choose how containers get the GPUs",
    )
    role = toolkit(
        "debian12",
        nvidia_container_toolkit_gpu_access=setting,
        _nvidia_container_toolkit_docker_version=docker,
    )
    expression = task["ansible.builtin.set_fact"]["_nvidia_container_toolkit_access"]
    assert role.templar.template(trust_as_template(expression)).strip() == expected


def _daemon_config(access: str, current: dict | None, **extra) -> tuple[dict, dict]:
    task = _task(
        "nvidia_container_toolkit",
        "configure.yml",
        "Nvidia container toolkit | Compute the Docker configuration with the NVIDIA runtime",
    )
    slurp = (
        {"content": base64.b64encode(json.dumps(current).encode()).decode()}
        if current is not None
        else {"failed": True, "msg": "file not found"}
    )
    role = toolkit(
        "ubuntu2204",
        _nvidia_container_toolkit_access=access,
        __nvidia_container_toolkit_daemon_json=slurp,
        **extra,
    )
    role.templar.available_variables = dict(
        role.templar.available_variables,
        _nvidia_container_toolkit_current=trust_as_template(
            task["vars"]["_nvidia_container_toolkit_current"]
        ),
    )
    facts = task["ansible.builtin.set_fact"]
    return (
        role.templar.template(trust_as_template(facts["_nvidia_container_toolkit_daemon_current"])),
        role.templar.template(trust_as_template(facts["_nvidia_container_toolkit_daemon_config"])),
    )


def test_daemon_json_keeps_other_settings_and_adds_the_runtime():
    current = {"log-driver": "json-file", "log-opts": {"max-file": "3", "max-size": "50m"}}
    before, after = _daemon_config("cdi", current)
    assert before == current
    assert after == {
        "features": {"cdi": True},
        "log-driver": "json-file",
        "log-opts": {"max-file": "3", "max-size": "50m"},
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
    }
    # A second run finds the runtime and writes nothing.
    again_before, again_after = _daemon_config("cdi", after)
    assert again_before == again_after


def test_daemon_json_for_gpus_mode_and_default_runtime():
    _, after = _daemon_config("gpus", None, nvidia_container_toolkit_default_runtime=True)
    assert after == {
        "default-runtime": "nvidia",
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
    }


def test_daemon_json_renders_like_the_docker_engine_role():
    current = {"log-driver": "json-file", "insecure-registries": ["registry.lan:5000"]}
    _, after = _daemon_config("cdi", current)
    role = toolkit("ubuntu2204", _nvidia_container_toolkit_daemon_config=after)
    text = role.render("daemon.json.j2")
    assert json.loads(text) == after
    # docker_engine writes `to_nice_json(indent=2)` plus a newline; byte-identical output means
    # neither role rewrites (and restarts Docker for) what the other wrote.
    assert text == json.dumps(after, indent=2, sort_keys=True) + "\n"


# --- argument specs ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ["nvidia_driver", "nvidia_container_toolkit"])
def test_argument_spec_lists_the_same_variables_as_defaults(role):
    spec = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    assert set(spec["argument_specs"]["main"]["options"]) == set(defaults)
    assert spec["argument_specs"]["preflight"] == spec["argument_specs"]["main"]
    for name, option in spec["argument_specs"]["main"]["options"].items():
        assert name.startswith(role + "_")
        assert option.get("description"), name
        if "default" in option:
            assert option["default"] == defaults[name], name


def _validator(role: str) -> ArgumentSpecValidator:
    spec = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    options = {
        name: {key: value for key, value in option.items() if key != "description"}
        for name, option in spec["argument_specs"]["main"]["options"].items()
    }
    return ArgumentSpecValidator(options)


@pytest.mark.parametrize(
    ("role", "bad"),
    [
        ("nvidia_driver", {"nvidia_driver_kernel_modules": "closed"}),
        ("nvidia_driver", {"nvidia_driver_fabric_manager": "yes-please"}),
        ("nvidia_driver", {"nvidia_driver_secure_boot": "ignore"}),
        ("nvidia_driver", {"nvidia_driver_module_params": ["NVreg_A=1"]}),
        ("nvidia_driver", {"nvidia_driver_reboot_timeout": "soon"}),
        ("nvidia_driver", {"nvidia_driver_hold_packages": "maybe"}),
        ("nvidia_container_toolkit", {"nvidia_container_toolkit_gpu_access": "all"}),
        ("nvidia_container_toolkit", {"nvidia_container_toolkit_verify_pull": "always"}),
        ("nvidia_container_toolkit", {"nvidia_container_toolkit_default_runtime": "nvidia"}),
    ],
)
def test_argument_spec_rejects_bad_values(role, bad):
    result = _validator(role).validate(bad)
    assert result.error_messages, bad


@pytest.mark.parametrize(
    ("role", "good"),
    [
        ("nvidia_driver", {"nvidia_driver_kernel_modules": "open", "nvidia_driver_branch": "580"}),
        ("nvidia_driver", {"nvidia_driver_module_params": {"NVreg_EnableGpuFirmware": 1}}),
        ("nvidia_container_toolkit", {"nvidia_container_toolkit_gpu_access": "cdi"}),
    ],
)
def test_argument_spec_accepts_good_values(role, good):
    assert _validator(role).validate(good).error_messages == []


# --- filters for the post-install checks ---------------------------------------------------


def test_nvidia_smi_query_parsing():
    gpus = servekit_nvidia.nvidia_smi_gpus((FIXTURES / "h100_nvidia_smi_query.csv").read_text())
    assert len(gpus) == 8
    assert {g["driver_version"] for g in gpus} == {"580.126.20"}
    assert {g["persistence_mode"] for g in gpus} == {"Enabled"}
    assert gpus[0] == {
        "driver_version": "580.126.20",
        "pci_bus_id": "00000000:1B:00.0",
        "name": "NVIDIA H100 80GB HBM3",
        "persistence_mode": "Enabled",
    }
    assert servekit_nvidia.nvidia_smi_gpus("") == []


def test_fabric_state_parsing():
    ready = servekit_nvidia.nvidia_smi_fabric(
        (FIXTURES / "h100_nvidia_smi_q_fabric_ready.txt").read_text()
    )
    assert len(ready) == 8
    assert {(f["state"], f["status"]) for f in ready} == {("Completed", "Success")}
    training = servekit_nvidia.nvidia_smi_fabric(
        (FIXTURES / "h100_nvidia_smi_q_fabric_training.txt").read_text()
    )
    assert [f["state"] for f in training].count("In Progress") == 2
    assert training[7]["pci_bus_id"] == "00000000:DF:00.0"
    no_nvlink = servekit_nvidia.nvidia_smi_fabric((FIXTURES / "l40s_nvidia_smi_q.txt").read_text())
    assert no_nvlink == [{"pci_bus_id": "00000000:17:00.0", "state": "N/A", "status": "N/A"}]


def test_kernel_module_flavour():
    flavour = servekit_nvidia.nvidia_module_flavour
    assert flavour((FIXTURES / "proc_driver_nvidia_version_open.txt").read_text()) == "open"
    assert (
        flavour((FIXTURES / "proc_driver_nvidia_version_proprietary.txt").read_text())
        == "proprietary"
    )
    assert flavour("") == "none"


def test_custom_kernel_gets_headers_but_no_meta_package():
    role = driver("debian12", "p100_x2.lspci")
    role.templar.available_variables = dict(
        role.templar.available_variables,
        ansible_facts=dict(
            OS_FACTS["debian12"],
            kernel="6.18.44-custom",
            architecture="x86_64",
            servekit_gpu=gpu_facts("p100_x2.lspci"),
        ),
    )
    assert role["_nvidia_driver_all_kernel_packages"] == ["linux-headers-6.18.44-custom", "dkms"]

"""Host checks for `make verify`: pytest-testinfra over the deployment's own inventory.

Run as `pytest tests/infra --hosts=ansible://gpu_hosts --ansible-inventory=INVENTORY`
(`servekit verify` runs one such process per host, in parallel).

Settings come from the inventory, with the roles' defaults (read from their
`defaults/main.yml`) where it says nothing. The testinfra ansible backend does not template:
a value that is still a Jinja template or a vault secret counts as unknown here, and the
checks that need it read what the deployment wrote on the host instead (the unit file, the
env file).
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"
UNIT_FILE = "/etc/systemd/system/vllm.service"
ENV_FILE = "/etc/vllm/vllm.env"
CONTAINER = "vllm"

# Site-wide settings that the roles read with `servekit_* | default(...)`.
SITE_DEFAULTS = {
    "servekit_model_id": "Qwen/Qwen3-8B",
    "servekit_model_root": "/opt/models",
    "servekit_accelerator": "gpu",
}
DEFAULT_ROLES = ("vllm_service", "nvidia_driver", "nvidia_container_toolkit")


def is_unresolved(value: Any) -> bool:
    """True for a Jinja template or an Ansible Vault value: meaningless without Ansible."""
    if isinstance(value, dict) and "__ansible_vault" in value:
        return True
    return isinstance(value, str) and (
        "{{" in value or "{%" in value or value.startswith("$ANSIBLE_VAULT")
    )


@cache
def role_defaults() -> dict[str, Any]:
    """The plain (non-template) defaults of the roles whose settings the checks compare."""
    values: dict[str, Any] = {}
    for role in DEFAULT_ROLES:
        data = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
        values.update({k: v for k, v in data.items() if not is_unresolved(v)})
    return values


@pytest.fixture(scope="module")
def inventory_vars(host) -> dict[str, Any]:
    """The host's variables exactly as the inventory gives them (templates untouched)."""
    return dict(host.ansible.get_variables())


@pytest.fixture(scope="module")
def hostvars(inventory_vars) -> dict[str, Any]:
    """Defaults overlaid with the inventory's plain values."""
    values = {**role_defaults(), **SITE_DEFAULTS}
    values.update({k: v for k, v in inventory_vars.items() if not is_unresolved(v)})
    return values


@pytest.fixture(scope="module")
def vllm_container(host):
    """`docker inspect` of the running vLLM container, or None when there is none."""
    result = host.run("docker inspect %s", CONTAINER)
    if result.rc != 0:
        return None
    return json.loads(result.stdout)[0]


@pytest.fixture(scope="module")
def unit_text(host) -> str:
    unit = host.file(UNIT_FILE)
    assert unit.exists, f"{UNIT_FILE} is missing: vllm_service was never deployed here"
    return unit.content_string


@pytest.fixture(scope="module")
def docker_run_args(unit_text) -> list[str]:
    """The `docker run` words of the unit's ExecStart (continuation lines joined)."""
    args = exec_start_args(unit_text)
    assert args[:2] == ["/usr/bin/docker", "run"], (
        f"{UNIT_FILE}: expected ExecStart=/usr/bin/docker run ..., got {' '.join(args)[:300]}"
    )
    return args


@pytest.fixture(scope="module")
def unit_image(docker_run_args) -> str:
    """The image reference the unit runs (the word before the model directory)."""
    image = image_of(docker_run_args)
    assert image, f"{UNIT_FILE}: no image found in ExecStart: {' '.join(docker_run_args)[:400]}"
    return image


@pytest.fixture(scope="module")
def api_key(host) -> str | None:
    """VLLM_API_KEY from the env file (read as root), or None when the file sets none."""
    text = read_as_root(host, ENV_FILE)
    assert text is not None, f"cannot read {ENV_FILE} on the host, even as root"
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "VLLM_API_KEY":
            value = value.strip().strip("'\"")
            return value or None
    return None


def journal(host, unit: str, lines: int = 40) -> str:
    return host.run("journalctl -u %s -n %s --no-pager", unit, str(lines)).stdout


def read_as_root(host, path: str) -> str | None:
    """A file's text, read as root (sudo only when the connection is not root already)."""
    result = host.run("cat -- %s", path)
    if result.rc == 0:
        return result.stdout
    if host.user().name != "root":
        with host.sudo():
            result = host.run("cat -- %s", path)
        if result.rc == 0:
            return result.stdout
    return None


def exec_start_args(unit_text: str) -> list[str]:
    """The words of the (first) ExecStart= of a unit file, with `\\` continuations joined."""
    joined = re.sub(r"\\\n", " ", unit_text)
    for line in joined.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name == "ExecStart":
            return shlex.split(value.lstrip("-@:+!"))
    return []


#: Where the unit mounts the model in the container: `vllm serve`'s positional argument.
CONTAINER_MODEL_DIR = "/models/"


def image_of(docker_run_args: list[str]) -> str | None:
    """The image of a `docker run ... IMAGE /models/<name> ...` line as the vLLM unit writes
    it (`vllm serve MODEL`: the model follows the image)."""
    for i, word in enumerate(docker_run_args[1:], start=1):
        before = docker_run_args[i - 1]
        if word.startswith(CONTAINER_MODEL_DIR) and not before.startswith("-"):
            return before
    return None


@pytest.fixture(scope="module")
def inventory_path(request) -> Path:
    """The inventory `make verify` checks (pytest-testinfra's --ansible-inventory)."""
    return Path(request.config.getoption("ansible_inventory"))


@pytest.fixture(scope="module")
def pinned_vllm_version(inventory_vars) -> str:
    """servekit_vllm_version: the inventory's, else the playbooks' definition."""
    from servekit.images import vllm_version

    value = inventory_vars.get("servekit_vllm_version")
    return str(value) if value and not is_unresolved(value) else vllm_version(ROOT)


def gpu_args_of(docker_run_args: list[str]) -> list[str]:
    """How the unit hands GPUs to the container: `--gpus X` and/or CDI `--device` names."""
    out: list[str] = []
    for i, word in enumerate(docker_run_args[:-1]):
        nxt = docker_run_args[i + 1]
        if word == "--gpus" or (word == "--device" and nxt.startswith("nvidia.com/")):
            out += [word, nxt]
    out += [w for w in docker_run_args if w.startswith("--gpus=")]
    return out


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """`registry/repo:tag@sha256:d` -> (normalised repository, tag, digest).

    Docker Hub names are normalised the way `RepoDigests` shows them (no `docker.io/`,
    no `library/`).
    """
    name, _, digest = ref.partition("@")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    for prefix in ("docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if name.startswith("library/") and name.count("/") == 1:
        name = name[len("library/") :]
    return name, tag, digest or None


_KEY_IN_ARGS = re.compile(r"(--api-key[= ]+|VLLM_API_KEY=)(\S+)")


def redact(text: str, secret: str | None) -> str:
    """``text`` without the key: the known secret, and whatever follows --api-key or
    VLLM_API_KEY= (a key that the env file does not hold is still a key)."""
    if secret:
        text = text.replace(secret, "<API key>")

    def hide(match: re.Match[str]) -> str:
        if match.group(2).startswith("<API"):
            return match.group(0)
        return match.group(1) + "<redacted>"

    return _KEY_IN_ARGS.sub(hide, text)

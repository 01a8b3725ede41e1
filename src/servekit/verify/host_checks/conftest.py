"""Host checks for `make verify`: pytest-testinfra over the deployment's own inventory.

`servekit verify` runs them, one pytest process per host, in parallel, as
`pytest src/servekit/verify/host_checks/test_*.py --hosts=ansible://HOST
--ansible-inventory=INVENTORY [--deep]` from the checkout. What the checks read on a host,
and the settings they compare with (the inventory's plain values over the roles' defaults),
are in ``servekit.verify.host_facts``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from servekit.inventory import is_unresolved
from servekit.verify.host_facts import (
    CONTAINER,
    ENV_FILE,
    GATE_FILE,
    UNIT_FILE,
    env_value,
    exec_start_args,
    gate_key,
    host_defaults,
    image_of,
    read_as_root,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--deep",
        action="store_true",
        default=False,
        help="hash every model file against the manifest's SHA-256 (sizes only without it)",
    )


@pytest.fixture(scope="session")
def deep(request) -> bool:
    """`servekit verify --deep`: checks read whole files where they otherwise compare sizes."""
    return bool(request.config.getoption("deep"))


@pytest.fixture(scope="module")
def inventory_vars(host) -> dict[str, Any]:
    """The host's variables exactly as the inventory gives them (templates untouched)."""
    return dict(host.ansible.get_variables())


@pytest.fixture(scope="module")
def hostvars(inventory_vars) -> dict[str, Any]:
    """Defaults overlaid with the inventory's plain values."""
    values = host_defaults()
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
def api_keys(host) -> dict[str, str]:
    """The server's API keys (read as root), by where each is set: the route gate's settings
    file, and a VLLM_API_KEY in the env file (only with vllm_service_allow_unsafe_args).
    Empty when neither sets one."""
    keys = {}
    gate = read_as_root(host, GATE_FILE)
    assert gate is not None, f"cannot read {GATE_FILE} on the host, even as root: re-deploy"
    try:
        keys[f"the api_key of {GATE_FILE}"] = gate_key(gate)
    except ValueError as exc:
        pytest.fail(f"{GATE_FILE} is not the route gate's settings ({exc}): re-deploy")
    env = read_as_root(host, ENV_FILE)
    assert env is not None, f"cannot read {ENV_FILE} on the host, even as root"
    keys[f"the VLLM_API_KEY of {ENV_FILE}"] = env_value(env, "VLLM_API_KEY")
    return {origin: key for origin, key in keys.items() if key}


@pytest.fixture(scope="module")
def inventory_path(request) -> Path:
    """The inventory `make verify` checks (pytest-testinfra's --ansible-inventory)."""
    return Path(request.config.getoption("ansible_inventory"))


@pytest.fixture(scope="module")
def pinned_vllm_version(inventory_vars) -> str:
    """servekit_vllm_version: the inventory's, else the playbooks' definition."""
    from servekit.checkout import repo_root
    from servekit.images import vllm_version

    value = inventory_vars.get("servekit_vllm_version")
    return str(value) if value and not is_unresolved(value) else vllm_version(repo_root())

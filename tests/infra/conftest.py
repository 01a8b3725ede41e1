"""Host checks for `make verify`: pytest-testinfra over the deployment's own inventory.

Run as `pytest tests/infra --hosts=ansible://gpu_hosts --ansible-inventory=INVENTORY`.
Settings come from the inventory, with the roles' defaults where it says nothing.
"""

from __future__ import annotations

import json

import pytest

DEFAULTS = {
    "vllm_service_port": 8000,
    "vllm_service_bind_address": "127.0.0.1",
    "vllm_service_served_model_name": "Qwen3-8B",
    "vllm_service_max_model_len": 8192,
    "servekit_model_id": "Qwen/Qwen3-8B",
    "servekit_model_root": "/opt/models",
    "servekit_accelerator": "gpu",
}


@pytest.fixture(scope="module")
def hostvars(host):
    values = dict(DEFAULTS)
    for key, value in host.ansible.get_variables().items():
        if not (isinstance(value, str) and "{{" in value):
            values[key] = value
    return values


@pytest.fixture(scope="module")
def vllm_container(host):
    """`docker inspect` of the running vLLM container, or None when there is none."""
    result = host.run("docker inspect vllm")
    if result.rc != 0:
        return None
    return json.loads(result.stdout)[0]


def journal(host, unit: str, lines: int = 40) -> str:
    return host.run(f"journalctl -u {unit} -n {lines} --no-pager").stdout

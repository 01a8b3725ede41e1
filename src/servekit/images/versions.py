"""The kit's one vLLM version (``servekit_vllm_version``), as the playbooks define it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

#: Where the playbooks define it (relative to the checkout); GPU hosts and the sandbox read it.
VERSIONS_FILE = Path("ansible/playbooks/group_vars/all/vllm.yml")

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def vllm_version(root: Path) -> str:
    """``servekit_vllm_version`` from the checkout at ``root``.

    ``SERVEKIT_VLLM_VERSION`` overrides it, as ``-e servekit_vllm_version=...`` does for
    Ansible (the Makefile passes one to the other).
    """
    value = os.environ.get("SERVEKIT_VLLM_VERSION") or ""
    source = "SERVEKIT_VLLM_VERSION"
    if not value:
        path = root / VERSIONS_FILE
        data = yaml.safe_load(path.read_text()) or {}
        value = str(data.get("servekit_vllm_version") or "")
        source = str(VERSIONS_FILE)
    if not _VERSION_RE.match(value):
        raise ValueError(
            f"servekit_vllm_version must be a release such as 0.32.0 (from {source}), got {value!r}"
        )
    return value

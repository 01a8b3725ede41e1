"""The environment the unit tests run `ansible-playbook` in against this machine: the kit's
ansible.cfg, no colour, facts and temporary files in the test's own directory, and one JSON
line per result so a failure message is read exactly. Nothing of the caller's ANSIBLE_*
settings leaks in."""

from __future__ import annotations

import os
from pathlib import Path

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


def local_ansible_env(workdir: Path, **extra: str) -> dict[str, str]:
    kept = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ANSIBLE_") and key not in ("FORCE_COLOR", "PY_COLORS")
    }
    return (
        kept
        | {
            "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(workdir / "facts"),
            "ANSIBLE_LOCAL_TEMP": str(workdir / "tmp"),
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
        }
        | extra
    )

"""The servekit checkout the package works from: its Ansible roles, recipes and inventories.

The library reads what the playbooks define (the roles' defaults, the vLLM version) from the
checkout, never a copy of it: ``repo_root()`` finds the checkout, ``role_defaults()`` reads a
role's ``defaults/main.yml``.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from servekit.inventory import is_unresolved

ROLES = Path("ansible") / "roles"


class CheckoutError(RuntimeError):
    """The servekit checkout cannot be found; the message says how to name it."""


def repo_root() -> Path:
    """The servekit checkout: the directory holding ``pyproject.toml`` and ``docker/`` above
    this package, else above the working directory.

    ``SERVEKIT_REPO_ROOT`` overrides it (for an installed package, point it at a checkout).
    """
    env = os.environ.get("SERVEKIT_REPO_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in [*here.parents, Path.cwd(), *Path.cwd().parents]:
        if (parent / "pyproject.toml").is_file() and (parent / "docker").is_dir():
            return parent
    raise CheckoutError(
        "cannot find the servekit checkout (pyproject.toml + docker/); set SERVEKIT_REPO_ROOT"
    )


def role_defaults(*roles: str, root: Path | None = None, plain: bool = False) -> dict[str, Any]:
    """The defaults of ``roles`` (``ansible/roles/<role>/defaults/main.yml``), later roles over
    earlier ones. ``plain`` leaves out the values only Ansible can resolve (templates, vault)."""
    values: dict[str, Any] = {}
    for role in roles:
        values.update(_load(root or repo_root(), role))
    if plain:
        return {k: v for k, v in values.items() if not is_unresolved(v)}
    return values


@cache
def _load(root: Path, role: str) -> dict[str, Any]:
    return yaml.safe_load((root / ROLES / role / "defaults" / "main.yml").read_text()) or {}

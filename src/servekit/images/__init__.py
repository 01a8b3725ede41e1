"""Container images of the kit: the one vLLM version, and digests locked per site."""

from __future__ import annotations

# ``lock`` and ``check`` stay in .lock: re-exporting ``lock`` would shadow the submodule.
from .lock import (
    LOCK_NAME,
    LockError,
    LockStatus,
    lock_path,
    read_lock,
    render_status_table,
    write_lock,
)
from .registry import ImageRef, RegistryError, parse_reference, resolve_digest
from .versions import VERSIONS_FILE, vllm_version

__all__ = [
    "LOCK_NAME",
    "VERSIONS_FILE",
    "ImageRef",
    "LockError",
    "LockStatus",
    "RegistryError",
    "lock_path",
    "parse_reference",
    "read_lock",
    "render_status_table",
    "resolve_digest",
    "vllm_version",
    "write_lock",
]

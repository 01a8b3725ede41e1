"""Filters that tell whether a managed file or directory already is what a task would make.

Each template or copy costs two round trips on a converged host (a checksum, then the file
module for owner and mode), even with nothing to change. The roles read the state of all
their files with one `servekit_file_state` call (ansible/library) and skip the tasks whose
file is already current; a file that differs in any way (content, mode, owner, group) or is
missing goes through the task as before, so what lands on the host is unchanged.
Unit-tested in tests/unit/test_files.py.
"""

from __future__ import annotations

import hashlib


def file_current(
    found: dict, dest: str, content: str, mode: str, owner: str = "root", group: str = "root"
) -> bool:
    """True when ``found`` (a registered `servekit_file_state` result) has ``dest`` as a
    regular file with exactly ``content`` (UTF-8), ``mode``, ``owner`` and ``group``."""
    entry = _entry(found, dest)
    if entry is None or not entry.get("isreg", False):
        return False
    want = hashlib.sha1(content.encode("utf-8")).hexdigest()
    return (
        entry.get("checksum") == want
        and _octal(entry.get("mode")) == _octal(mode)
        and entry.get("pw_name") == owner
        and entry.get("gr_name") == group
    )


def dir_current(
    found: dict, path: str, mode: str, owner: str = "root", group: str = "root"
) -> bool:
    """True when ``found`` has ``path`` as a directory with ``mode``, ``owner`` and ``group``."""
    return _attrs_current(_entry(found, path), "isdir", mode, owner, group)


def file_attrs_current(
    found: dict, path: str, mode: str, owner: str = "root", group: str = "root"
) -> bool:
    """True when ``found`` has ``path`` as a regular file with ``mode``, ``owner`` and
    ``group``, whatever its content (for files whose content is checked another way)."""
    return _attrs_current(_entry(found, path), "isreg", mode, owner, group)


def present(found: dict, path: str) -> bool:
    """True when ``found`` reports ``path`` (of any type)."""
    return _entry(found, path) is not None


def _entry(found: dict | None, path: str) -> dict | None:
    return next((f for f in (found or {}).get("files", []) if f.get("path") == path), None)


def _attrs_current(entry: dict | None, kind: str, mode: str, owner: str, group: str) -> bool:
    return (
        entry is not None
        and entry.get(kind, False)
        and _octal(entry.get("mode")) == _octal(mode)
        and entry.get("pw_name") == owner
        and entry.get("gr_name") == group
    )


def _octal(mode: object) -> int | None:
    try:
        return int(str(mode), 8)
    except ValueError:
        return None


class FilterModule:
    def filters(self):
        return {
            "servekit_file_current": file_current,
            "servekit_dir_current": dir_current,
            "servekit_file_attrs_current": file_attrs_current,
            "servekit_path_present": present,
        }

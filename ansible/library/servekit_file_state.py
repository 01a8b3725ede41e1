#!/usr/bin/python
"""Report checksum, mode and ownership of a list of files in one call."""

from __future__ import annotations

DOCUMENTATION = r"""
module: servekit_file_state
short_description: Checksum, mode and ownership of several files, read in one call
description:
  - Reports each file of O(paths) that exists as a regular file, with its SHA-1 checksum,
    octal mode, owner and group (the keys C(ansible.builtin.find) uses). Missing files are
    left out, without a warning: on a first converge none of them exist yet.
  - Read-only; the roles pass the result to the C(servekit_file_current) filter to skip
    template and copy tasks whose file is already current (two round trips each).
options:
  paths: {type: list, elements: path, required: true, description: The files to read.}
author: servekit
"""

import grp
import os
import pwd
import stat

from ansible.module_utils.basic import AnsibleModule


def _name(lookup, ident):
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


def file_state(module, path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return {"path": path, "isreg": False}
    return {
        "path": path,
        "isreg": True,
        "checksum": module.sha1(path),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "pw_name": _name(pwd.getpwuid, st.st_uid),
        "gr_name": _name(grp.getgrgid, st.st_gid),
    }


def main():
    module = AnsibleModule(
        argument_spec={"paths": {"type": "list", "elements": "path", "required": True}},
        supports_check_mode=True,
    )
    files = [state for state in (file_state(module, p) for p in module.params["paths"]) if state]
    module.exit_json(changed=False, files=files)


if __name__ == "__main__":
    main()

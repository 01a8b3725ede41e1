#!/usr/bin/python
"""Report checksum, mode and ownership of a list of files in one call."""

from __future__ import annotations

DOCUMENTATION = r"""
module: servekit_file_state
short_description: Checksum, mode and ownership of several files, read in one call
description:
  - Reports each path of O(paths) that exists, with its octal mode, owner and group, and for
    a regular file its SHA-1 checksum (the keys C(ansible.builtin.find) uses). Missing paths
    are left out, without a warning: on a first converge none of them exist yet.
  - Read-only; the roles pass the result to the C(servekit_file_current) and
    C(servekit_dir_current) filters to skip file, template and copy tasks whose path is
    already current (one or two round trips each).
options:
  paths: {type: list, elements: path, required: true, description: The paths to read.}
  contents:
    type: list
    elements: path
    default: []
    description: Paths of O(paths) whose content is returned too (base64, as slurp does).
author: servekit
"""

import base64
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


def file_state(module, path, with_content):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    state = {
        "path": path,
        "isreg": stat.S_ISREG(st.st_mode),
        "isdir": stat.S_ISDIR(st.st_mode),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "pw_name": _name(pwd.getpwuid, st.st_uid),
        "gr_name": _name(grp.getgrgid, st.st_gid),
    }
    if state["isreg"]:
        state["checksum"] = module.sha1(path)
        if with_content:
            with open(path, "rb") as handle:
                state["content"] = base64.b64encode(handle.read()).decode("ascii")
    return state


def main():
    module = AnsibleModule(
        argument_spec={
            "paths": {"type": "list", "elements": "path", "required": True},
            "contents": {"type": "list", "elements": "path", "default": []},
        },
        supports_check_mode=True,
    )
    contents = set(module.params["contents"])
    states = (file_state(module, p, p in contents) for p in module.params["paths"])
    files = [state for state in states if state]
    module.exit_json(changed=False, files=files)


if __name__ == "__main__":
    main()

"""Filters that read `dpkg-query`, so a converged Debian host skips apt altogether.

The apt module opens the package cache on every run (about half a second a task on a small
host) and `dpkg_selections` costs a round trip per package; when every pinned package is
already installed at its pinned version and held, neither has anything to do. One
`dpkg-query` over the role's packages tells which are not there yet: the roles install only
when that list is not empty, and hold only what is not held. The same shortcut for pip: the
model role reads the pins of its hashed SDK lock (`servekit_pip_requirements`) and installs
only when one is not met. Pure functions, unit-tested in tests/unit/test_packages.py and
tests/unit/test_model_lock.py.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

# Package, version, status (e.g. "ii "), selection ("install", "hold"), one line a package.
DPKG_QUERY_FORMAT = "${Package}\\t${Version}\\t${db:Status-Abbrev}\\t${db:Status-Want}\\n"


def dpkg_query_argv(specs: list[str]) -> list[str]:
    """The `dpkg-query` command line that reports the packages of ``specs`` ("name" or
    "name=version", as apt takes them). It exits 1 when one of them is unknown to dpkg; the
    packages it knows are still reported."""
    names = [_split(spec)[0] for spec in specs]
    return ["dpkg-query", "--show", f"--showformat={DPKG_QUERY_FORMAT}", *names]


def dpkg_unmet(query_stdout: str, specs: list[str]) -> list[str]:
    """The specs of ``specs`` that the host does not meet: the package is not fully installed
    (status "ii", or "hi" when held), or its version is not the pinned one (apt's "*"
    wildcard allowed)."""
    installed = _installed(query_stdout)
    unmet = []
    for spec in specs:
        name, version = _split(spec)
        have = installed.get(name)
        if have is None or (version is not None and not fnmatchcase(have, version)):
            unmet.append(spec)
    return unmet


def dpkg_unheld(query_stdout: str, names: list[str]) -> list[str]:
    """The packages of ``names`` that dpkg does not hold (or does not know yet)."""
    held = {
        fields[0]
        for fields in _rows(query_stdout)
        if len(fields) >= 4 and fields[3].strip() == "hold"
    }
    return [name for name in names if name not in held]


def pip_requirements(text: str) -> list[str]:
    """The requirements of a pip requirements file (the model role's hashed SDK lock) as pip
    reads them, without comments, options and hashes: "name==version" or, with an environment
    marker, "name==version ; marker". Lines continued with a backslash are joined first."""
    requirements = []
    for line in re.sub(r"\\\r?\n", " ", text or "").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)  # a comment: "#" at the start or after a space
        line = re.split(r"\s--?[a-z]", " " + line, maxsplit=1)[0].strip()  # options, --hash=...
        if line and not line.startswith("-"):
            requirements.append(re.sub(r"\s*;\s*", " ; ", line, count=1))
    return requirements


def _installed(query_stdout: str) -> dict[str, str]:
    return {
        fields[0]: fields[1]
        for fields in _rows(query_stdout)
        if len(fields) >= 3 and _fully_installed(fields[2])
    }


def _fully_installed(status_abbrev: str) -> bool:
    # Selection, status, error flag: "ii " or "hi " (held); "iU", "iF", "rc", "iiR" are not.
    return len(status_abbrev) >= 2 and status_abbrev[1] == "i" and not status_abbrev[2:].strip()


def _rows(query_stdout: str) -> list[list[str]]:
    return [line.split("\t") for line in (query_stdout or "").splitlines() if line.strip()]


def _split(spec: str) -> tuple[str, str | None]:
    name, sep, version = spec.partition("=")
    return name, (version if sep else None)


class FilterModule:
    def filters(self):
        return {
            "servekit_dpkg_query_argv": dpkg_query_argv,
            "servekit_dpkg_unmet": dpkg_unmet,
            "servekit_dpkg_unheld": dpkg_unheld,
            "servekit_pip_requirements": pip_requirements,
        }

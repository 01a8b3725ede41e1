"""The dpkg-query filters that let a converged host skip apt (ansible/plugins/filter)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from servekit_packages import dpkg_query_argv, dpkg_unheld, dpkg_unmet  # ansible/plugins/filter

ROOT = Path(__file__).resolve().parents[2]

# What dpkg-query prints with the roles' format on a converged host, a held package included.
CONVERGED = (
    "curl\t7.88.1-10+deb12u15\tii \tinstall\n"
    "docker.io\t20.10.24+dfsg1-1+deb12u1+b6\thi \thold\n"
    "prometheus\t2.42.0+ds-5+deb12u1\thi \thold\n"
)


def test_argv_names_the_packages_without_their_versions():
    argv = dpkg_query_argv(["docker.io=20.10.24+dfsg1-1+deb12u1+b6", "dbus"])
    assert argv[:2] == ["dpkg-query", "--show"]
    assert argv[3:] == ["docker.io", "dbus"]


def test_a_converged_host_meets_every_pin_and_holds_everything():
    specs = ["curl", "docker.io=20.10.24+dfsg1-1+deb12u1+b6", "prometheus=2.42.0+ds-5+deb12u1"]
    assert dpkg_unmet(CONVERGED, specs) == []
    assert dpkg_unheld(CONVERGED, ["docker.io", "prometheus"]) == []


def test_another_version_or_a_missing_package_is_unmet():
    specs = ["docker.io=20.10.25", "dbus", "curl=7.88.*"]
    assert dpkg_unmet(CONVERGED, specs) == ["docker.io=20.10.25", "dbus"]


@pytest.mark.parametrize(
    "status",
    ["rc ", "iU ", "iF ", "ii R", "un "],
    ids=["removed", "unpacked", "half", "reinst", "unknown"],
)
def test_a_package_that_is_not_fully_installed_is_unmet(status):
    assert dpkg_unmet(f"curl\t7.88.1\t{status}\tinstall\n", ["curl"]) == ["curl"]


def test_only_packages_not_on_hold_are_returned_for_holding():
    assert dpkg_unheld(CONVERGED, ["curl", "docker.io", "haproxy"]) == ["curl", "haproxy"]


def test_no_output_means_everything_is_to_do():
    assert dpkg_unmet("", ["curl"]) == ["curl"]
    assert dpkg_unheld(None, ["curl"]) == ["curl"]


def test_the_format_reads_this_machines_dpkg():
    # The real command: dpkg itself is always installed, and an unknown name exits 1.
    done = subprocess.run(
        [*dpkg_query_argv(["dpkg", "servekit-no-such-package"])], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert dpkg_unmet(done.stdout, ["dpkg", "servekit-no-such-package"]) == [
        "servekit-no-such-package"
    ]

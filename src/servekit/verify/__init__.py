"""`make verify`: prove every host of an inventory works, host by host.

- ``run``: the run: host checks (one pytest-testinfra process per host, in parallel), then
  request probes of every endpoint (in parallel), over an inventory read once;
- ``report``: what they found: per-host results, ``hosts.junit.xml`` and ``verify.json``;
- ``host_facts``: what the host checks read on a host (the vLLM unit, files as root);
- ``host_checks/``: the host checks themselves, pytest modules shipped with the package.
"""

from .report import (
    HostChecks,
    HostTest,
    VerifyResult,
    host_checks_as_runs,
    host_checks_rc,
    merge_junit,
    parse_junit,
    to_verify_json,
    write_verify_json,
)
from .run import GATEWAY_CHECKS, HOST_CHECKS, check_hosts, probe_all, run_verify

__all__ = [
    "GATEWAY_CHECKS",
    "HOST_CHECKS",
    "HostChecks",
    "HostTest",
    "VerifyResult",
    "check_hosts",
    "host_checks_as_runs",
    "host_checks_rc",
    "merge_junit",
    "parse_junit",
    "probe_all",
    "run_verify",
    "to_verify_json",
    "write_verify_json",
]

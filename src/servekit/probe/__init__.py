"""Request probes that prove a vLLM OpenAI-compatible endpoint works, and their reports.

Works against any vLLM URL: nothing here depends on how the server was deployed.

    from servekit.probe import run_probes
    run = run_probes("http://127.0.0.1:8000", model="Qwen3-8B")
    run.ok, [r.status for r in run.results]
"""

from servekit.probe.checks import PROBE_NAMES, probe_targets, run_probes
from servekit.probe.result import ProbeResult, ProbeRun

__all__ = ["PROBE_NAMES", "ProbeResult", "ProbeRun", "probe_targets", "run_probes"]

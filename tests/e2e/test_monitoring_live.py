"""The monitoring role on the sandbox: the real Prometheus scrapes the real vLLM and
node_exporter, and every vLLM or host expression of the dashboard and the alert rules
evaluates against what it scraped (a metric renamed by a vLLM upgrade fails here)."""

from __future__ import annotations

import json

import pytest
from sandbox_helpers import BASE_URL, on_host, wait_for

from servekit.probe import run_probes
from tests.promql import expressions, grafana_substitute, metric_names

pytestmark = pytest.mark.e2e

PROMETHEUS = "http://127.0.0.1:9090"  # on the sandbox host (the role's default listen address)
SCRAPE_BUDGET_S = 180


def prometheus(path: str, **params: str) -> dict:
    args = ["curl", "-s", "--max-time", "20", "-G", f"{PROMETHEUS}{path}"]
    for key, value in params.items():
        args += ["--data-urlencode", f"{key}={value}"]
    out = on_host(*args)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["status"] == "success", body
    return body["data"]


def query(expr: str) -> list[dict]:
    return prometheus("/api/v1/query", query=expr)["result"]


@pytest.fixture(scope="module")
def scraped(deployment):
    """Probe traffic, then enough scrapes for a 1-minute rate window to hold two samples."""
    run = run_probes(BASE_URL, "Qwen3-8B", checks=["health", "chat", "chat_stream", "completions"])
    assert run.ok, [r.detail for r in run.results if not r.ok]

    def all_up() -> bool:
        targets = prometheus("/api/v1/targets", state="active")["activeTargets"]
        jobs = {t["labels"]["job"] for t in targets if t["health"] == "up"}
        return {"vllm", "node"} <= jobs

    wait_for(all_up, "vllm and node targets up", SCRAPE_BUDGET_S, 2)
    wait_for(
        lambda: query('count_over_time(vllm:request_success_total{host="sandbox-1"}[1m]) >= 3'),
        "three scrapes of vLLM after the traffic",
        SCRAPE_BUDGET_S,
        2,
    )


def test_targets_are_up_and_labelled_by_inventory_host(scraped):
    targets = prometheus("/api/v1/targets", state="active")["activeTargets"]
    by_job = {(t["labels"]["job"], t["labels"]["host"]): t["health"] for t in targets}
    assert by_job[("vllm", "sandbox-1")] == "up"
    assert by_job[("node", "sandbox-1")] == "up"
    assert not any(job == "dcgm" for job, _ in by_job), "a CPU host must get no DCGM target"


LIVE = [e for e in expressions() if e.concerns & {"vllm", "host"} and "dcgm" not in e.concerns]


def test_there_are_expressions_to_check():
    sources = {e.source for e in LIVE}
    assert sources == {"rules", "dashboard"} and len(LIVE) >= 15, [e.name for e in LIVE]


@pytest.mark.parametrize("item", LIVE, ids=[f"{e.source}:{e.name}" for e in LIVE])
def test_expression_reads_real_series(scraped, item):
    expr = grafana_substitute(item.expr, {"host": "sandbox-1", "model_name": "Qwen3-8B"})
    # Every metric the expression reads exists, with the labels the fleet is filtered by.
    for name in sorted(metric_names(expr)):
        assert query(f'count({{__name__="{name}",host="sandbox-1"}})'), (
            f"{item.source} {item.name!r} reads {name}, which Prometheus has not scraped"
        )
    result = query(expr)  # raises on a syntax or type error, with Prometheus's reason
    if item.source == "dashboard":
        assert result, f"dashboard panel {item.name!r} would show no data: {expr}"

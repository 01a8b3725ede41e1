"""The PromQL servekit ships: alert rules and the Grafana dashboard, as data for the tests that
check it (tests/unit/test_monitoring.py offline, tests/e2e/test_monitoring_live.py on the sandbox).

`expressions(dashboard, rules)` lists every expression with where it comes from and what it is
about (vLLM, host or DCGM series), so a test can evaluate each one against a Prometheus that
scrapes a real deployment (`query`), or against recorded `/metrics` text in `promtool test
rules` (`parse_exposition`, `promtool_input_series`). The rules are an Ansible template
(`ansible/roles/monitoring/templates/servekit-alerts.yml.j2`); `render_rules` renders it with the
role defaults the way Ansible's template module does (same delimiters, `trim_blocks`), and
dashboard expressions carry Grafana variables that `grafana_substitute` replaces.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "ansible" / "roles" / "monitoring"
RULES_TEMPLATE = ROLE / "templates" / "servekit-alerts.yml.j2"
ROLE_DEFAULTS = ROLE / "defaults" / "main.yml"
DASHBOARD = ROOT / "monitoring" / "dashboards" / "servekit-fleet.json"

VLLM, HOST, DCGM = "vllm", "host", "dcgm"
# Scrape jobs of the monitoring role's prometheus.yml, by what they are about.
JOB_CONCERNS = {"vllm": VLLM, "node": HOST, "dcgm": DCGM}

_VLLM_METRIC = re.compile(r"\bvllm:[A-Za-z0-9_:]+")
_DCGM_METRIC = re.compile(r"\bDCGM_[A-Z0-9_]+")
_HOST_METRIC = re.compile(r"\b(?:node|servekit)_[A-Za-z0-9_]+")
_JOB = re.compile(r'\bjob\s*=\s*"([^"]+)"')
_GRAFANA_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


@dataclass(frozen=True)
class Expression:
    source: str  # "rules" or "dashboard"
    name: str  # the alert's name, or "<panel title> [<refId>]"
    expr: str  # as written (dashboard expressions still hold Grafana variables)
    concerns: frozenset[str]  # which of "vllm", "host", "dcgm" series it reads


def metric_names(expr: str) -> set[str]:
    """The vLLM, DCGM, node_exporter and servekit metric names an expression reads."""
    patterns = (_VLLM_METRIC, _DCGM_METRIC, _HOST_METRIC)
    return {m.group(0) for pattern in patterns for m in pattern.finditer(expr)}


def classify(expr: str) -> frozenset[str]:
    """What an expression is about: vLLM's own series, host series (node_exporter and its
    textfile collector) or GPU series (DCGM exporter); `up{job=...}` counts for its job."""
    concerns = set()
    if _VLLM_METRIC.search(expr):
        concerns.add(VLLM)
    if _DCGM_METRIC.search(expr):
        concerns.add(DCGM)
    if _HOST_METRIC.search(expr):
        concerns.add(HOST)
    for job in _JOB.findall(expr):
        if job in JOB_CONCERNS:
            concerns.add(JOB_CONCERNS[job])
    return frozenset(concerns)


def render_rules(
    template: Path = RULES_TEMPLATE,
    defaults: Path = ROLE_DEFAULTS,
    overrides: Mapping[str, object] | None = None,
) -> str:
    """The alert rules as the monitoring role writes them, with its defaults (and overrides)."""
    import jinja2

    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True
    )
    # Ansible's `comment` filter (plain style): the text between two bare "#" lines.
    env.filters["comment"] = lambda text: "\n".join(
        ["#", *(f"# {line}" for line in str(text).splitlines()), "#"]
    )
    variables = dict(yaml.safe_load(Path(defaults).read_text()))
    variables.update(overrides or {})
    variables.setdefault("ansible_managed", "Ansible managed")
    return env.from_string(Path(template).read_text()).render(**variables)


def _rules_document(rules: Path) -> dict:
    path = Path(rules)
    text = render_rules(path) if path.suffix == ".j2" else path.read_text()
    return yaml.safe_load(text)


def rule_expressions(rules: Path) -> list[Expression]:
    """Every rule of a rules file (or of the role's template, rendered with the defaults)."""
    found = []
    for group in _rules_document(rules)["groups"]:
        for rule in group["rules"]:
            expr = str(rule["expr"])
            name = rule.get("alert") or rule.get("record")
            found.append(Expression("rules", name, expr, classify(expr)))
    return found


def _panels(panels: Iterable[dict]) -> Iterable[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions(dashboard: Path) -> list[Expression]:
    """Every query of every panel of a Grafana dashboard JSON."""
    found = []
    for panel in _panels(json.loads(Path(dashboard).read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                name = f"{panel['title']} [{target.get('refId', '?')}]"
                found.append(Expression("dashboard", name, expr, classify(expr)))
    return found


def expressions(dashboard: Path = DASHBOARD, rules: Path = RULES_TEMPLATE) -> list[Expression]:
    """The dashboard's queries, then the alert rules' expressions. `rules` may be the rendered
    file or the role's `.j2` template (rendered here with the role defaults)."""
    return dashboard_expressions(dashboard) + rule_expressions(rules)


def grafana_substitute(
    expr: str, variables: Mapping[str, str] | None = None, rate_interval: str = "1m"
) -> str:
    """Replace the dashboard's Grafana variables so Prometheus can evaluate the query:
    `$__rate_interval`/`$__interval` by ``rate_interval``, `$host` and `$model_name` by ".*"
    (every value, as the dashboard's "All") unless ``variables`` says otherwise."""
    values = {
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": rate_interval,
        "host": ".*",
        "model_name": ".*",
    }
    values.update(variables or {})

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VAR.sub(replace, expr)


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API refused a query."""


def query(prometheus_url: str, expr: str, timeout: float = 10.0) -> list[dict]:
    """Evaluate ``expr`` now through `GET /api/v1/query`; the `result` list (may be empty)."""
    url = prometheus_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # 400/422: a bad expression, with Prometheus's reason
        body = json.loads(exc.read() or b"{}")
    if body.get("status") != "success":
        raise PrometheusError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


# --- Prometheus text exposition format, for recorded /metrics ---------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str] = field(hash=False)
    value: float


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _labels(text: str) -> dict[str, str]:
    inner, labels, pos = text[1:-1], {}, 0
    while pos < len(inner):
        match = _LABEL.match(inner, pos)
        if not match:
            raise ValueError(f"bad label set {text!r}")
        value = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], match.group(2))
        labels[match.group(1)] = value
        pos = match.end()
    return labels


def parse_exposition(text: str) -> list[Sample]:
    """The samples of a `/metrics` body (comments, HELP and TYPE lines skipped)."""
    samples = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            raise ValueError(f"not a sample line: {line!r}")
        name, labels, value = match.groups()
        samples.append(Sample(name, _labels(labels) if labels else {}, float(value)))
    return samples


def _series_selector(name: str, labels: Mapping[str, str]) -> str:
    pairs = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return f"{name}{{{pairs}}}"


def _promtool_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**63 else repr(value)


def promtool_input_series(
    samples: Iterable[Sample], labels: Mapping[str, str], steps: int = 20
) -> list[dict]:
    """`input_series` for `promtool test rules`: every sample held constant for ``steps``
    intervals, with ``labels`` (job, instance, host: what the scrape adds) added."""
    return [
        {
            "series": _series_selector(s.name, {**s.labels, **labels}),
            "values": f"{_promtool_value(s.value)}x{steps}",
        }
        for s in samples
    ]

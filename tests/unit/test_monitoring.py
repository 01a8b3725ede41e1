"""The monitoring role's alert rules, scrape configuration and the Grafana dashboard, offline.

- The rules template, rendered with the role defaults exactly as Ansible renders it, passes
  `promtool check rules`, and `promtool test rules` proves each alert fires on a series that
  should raise it and stays silent on one that should not (tests/unit/fixtures/promtool/).
- Every vLLM expression of the dashboard returns data, and no vLLM alert fires, on the
  recorded /metrics of a real vLLM 0.32 server (tests/unit/fixtures/vllm/qwen3/metrics.txt).
- The DCGM expressions run against the recorded dcgm-exporter output
  (tests/unit/fixtures/dcgm/metrics.txt) and read only fields the exporter is told to collect.
- prometheus.yml is generated from the inventory (`promtool check config` as the role runs it),
  with the exporters scraped on their monitoring address; node_exporter and the DCGM exporter
  listen on that address only (`monitoring_exporter_listen_address`).
- `tests/promql.py` finds and classifies every expression, for the live test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_firewall import render

from tests import promql

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
ROLE = ANSIBLE / "roles" / "monitoring"
FIXTURES = Path(__file__).parent / "fixtures"
PROMTOOL_TESTS = FIXTURES / "promtool" / "servekit-alerts.test.yml"
VLLM_METRICS = FIXTURES / "vllm" / "qwen3" / "metrics.txt"
DCGM_METRICS = FIXTURES / "dcgm" / "metrics.txt"
COUNTERS = ROLE / "templates" / "dcgm-counters.csv.j2"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
ALERTS = {e.name for e in promql.rule_expressions(promql.RULES_TEMPLATE)}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make host-tools` installs Debian's prometheus package")
    return found


def _promtool_run(*args: str, cwd: Path | None = None, stdin: str | None = None) -> None:
    proc = subprocess.run(
        [_promtool(), *args], cwd=cwd, input=stdin, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rules_dir(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "servekit-alerts.yml").write_text(promql.render_rules(overrides=overrides))
    return tmp_path


def _promtool_test(tmp_path: Path, tests: dict) -> None:
    """`promtool test rules` on ``tests`` (a test file's contents) against the default rules."""
    _rules_dir(tmp_path)
    (tmp_path / "generated.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    _promtool_run("test", "rules", "generated.test.yml", cwd=tmp_path)


def _ansible_env(tmp_path: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")} | {
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(tmp_path / "facts"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }


# --- the alert rules ---------------------------------------------------------------------------


def test_rules_pass_promtool_check(tmp_path):
    _promtool_run("check", "rules", str(_rules_dir(tmp_path) / "servekit-alerts.yml"))


def test_rules_render_the_same_with_ansible(tmp_path):
    """The test renderer (plain Jinja2) writes what Ansible's template module writes."""
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars_files": [str(ROLE / "defaults" / "main.yml")],
                    "tasks": [
                        {
                            "name": "Render the rules",
                            "ansible.builtin.template": {
                                "src": str(promql.RULES_TEMPLATE),
                                "dest": str(tmp_path / "ansible.yml"),
                                "mode": "0644",
                            },
                        }
                    ],
                }
            ]
        )
    )
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "-c", "local", str(playbook)],
        env=_ansible_env(tmp_path) | {"ANSIBLE_PYTHON_INTERPRETER": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert promql.render_rules() == (tmp_path / "ansible.yml").read_text()


def test_promtool_unit_tests_pass(tmp_path):
    _rules_dir(tmp_path)
    shutil.copy(PROMTOOL_TESTS, tmp_path)
    _promtool_run("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)


def _subjects(test: dict) -> set[tuple[str | None, str | None]]:
    """The (host, gpu) pairs a promtool test's input series are about."""
    found = set()
    for series in (s["series"] for s in test["input_series"]):
        host, gpu = re.search(r'host="([^"]+)"', series), re.search(r'gpu="([^"]+)"', series)
        found.add((host and host.group(1), gpu and gpu.group(1)))
    return found


def test_every_alert_has_a_firing_and_a_silent_case():
    firing, silent = set(), set()
    for test in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            if case["exp_alerts"]:
                firing.add(case["alertname"])
                # Fewer alerts than hosts (or GPUs) in the test: the others stayed silent.
                if len(case["exp_alerts"]) < len(_subjects(test)):
                    silent.add(case["alertname"])
            else:
                silent.add(case["alertname"])
    assert firing == ALERTS
    assert silent == ALERTS


def test_thresholds_are_role_variables(tmp_path):
    """Every monitoring_alert_* default reaches the rules; changing one changes the rules."""
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    template = promql.RULES_TEMPLATE.read_text()
    for name in (n for n in defaults if n.startswith("monitoring_alert_")):
        assert name in template, f"{name} is not used by the alert rules"
    rules = promql.render_rules(
        overrides={"monitoring_alert_kv_cache_usage": 0.75, "monitoring_alert_ttft_p95_seconds": 7}
    )
    assert "vllm:kv_cache_usage_perc > 0.75" in rules
    assert "rate(vllm:time_to_first_token_seconds_bucket[5m]))) > 7" in rules


def test_role_defaults_and_argument_specs_list_the_same_variables():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    for entry in ("main", "exporters", "preflight"):
        assert set(specs[entry]["options"]) == set(defaults), entry
        for name, option in specs[entry]["options"].items():
            if "default" in option:
                assert option["default"] == defaults[name], name


# --- against recorded /metrics -------------------------------------------------------------------

VLLM_TARGET = {"job": "vllm", "instance": "gpu-1:8000", "host": "gpu-1"}
DCGM_TARGET = {"job": "dcgm", "instance": "gpu-1:9400", "host": "gpu-1"}


def _recorded_series(path: Path, target: dict[str, str]) -> list[dict]:
    samples = promql.parse_exposition(path.read_text())
    up = {"series": promql._series_selector("up", target), "values": "1x40"}
    return [up, *promql.promtool_input_series(samples, target, steps=40)]


def test_vllm_recording_has_every_vllm_metric_the_expressions_read():
    recorded = {s.name for s in promql.parse_exposition(VLLM_METRICS.read_text())}
    used = {
        name
        for e in promql.expressions()
        for name in promql.metric_names(e.expr)
        if name.startswith("vllm:")
    }
    assert used, "no vLLM expressions found"
    assert used <= recorded, f"not in vLLM 0.32's /metrics: {sorted(used - recorded)}"


def test_dashboard_vllm_queries_return_data_on_the_recording(tmp_path):
    """Each vLLM panel query, evaluated over the real server's series, returns something."""
    queries = [e for e in promql.dashboard_expressions(promql.DASHBOARD) if e.concerns == {"vllm"}]
    assert len(queries) >= 8
    checks = [
        {
            "expr": f"count({promql.grafana_substitute(e.expr)}) > bool 0",
            "eval_time": "9m",
            "exp_samples": [{"labels": "{}", "value": 1}],
        }
        for e in queries
    ]
    tests = {
        "rule_files": ["servekit-alerts.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": _recorded_series(VLLM_METRICS, VLLM_TARGET),
                "promql_expr_test": checks,
            }
        ],
    }
    _promtool_test(tmp_path, tests)


def test_idle_recorded_vllm_raises_no_alert(tmp_path):
    """A healthy idle server (the recording) raises none of the vLLM alerts."""
    vllm_alerts = [
        e.name for e in promql.rule_expressions(promql.RULES_TEMPLATE) if e.concerns == {"vllm"}
    ]
    assert "VllmMetricsMissing" in vllm_alerts
    _assert_silent(tmp_path, _recorded_series(VLLM_METRICS, VLLM_TARGET), vllm_alerts)


def test_dcgm_recording_is_valid_exposition_text():
    _promtool_run("check", "metrics", stdin=DCGM_METRICS.read_text())
    assert {s.name for s in promql.parse_exposition(DCGM_METRICS.read_text())} == {
        "DCGM_FI_DEV_SM_CLOCK",
        "DCGM_FI_DEV_MEM_CLOCK",
        "DCGM_FI_DEV_MEMORY_TEMP",
    }


def test_dcgm_alerts_stay_silent_on_the_recording(tmp_path):
    """The recorded GPU reports DCGM's not-supported sentinel as its memory temperature: the
    memory temperature alert must not take it for heat; the recorded series are there."""
    gpu_alerts = [
        e.name for e in promql.rule_expressions(promql.RULES_TEMPLATE) if e.concerns == {"dcgm"}
    ]
    assert "GpuMemoryTemperatureHigh" in gpu_alerts
    recorded_temperature = {
        "expr": "count(DCGM_FI_DEV_MEMORY_TEMP) > bool 0",
        "eval_time": "9m",
        "exp_samples": [{"labels": "{}", "value": 1}],
    }
    # Without the sentinel guard, the alert's comparison alone would match.
    bare_comparison = {
        **recorded_temperature,
        "expr": "count(DCGM_FI_DEV_MEMORY_TEMP > 95) > bool 0",
    }
    _assert_silent(
        tmp_path,
        _recorded_series(DCGM_METRICS, DCGM_TARGET),
        gpu_alerts,
        (recorded_temperature, bare_comparison),
    )


def _assert_silent(
    tmp_path: Path, series: list[dict], alerts: list[str], expressions: tuple[dict, ...] = ()
) -> None:
    """promtool: none of ``alerts`` fires over ``series`` within 9 minutes (and each of
    ``expressions`` gives what it expects)."""
    test: dict = {
        "interval": "15s",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": "9m", "alertname": name, "exp_alerts": []} for name in alerts
        ],
    }
    if expressions:
        test["promql_expr_test"] = list(expressions)
    tests = {
        "rule_files": ["servekit-alerts.yml"],
        "evaluation_interval": "15s",
        "tests": [test],
    }
    _promtool_test(tmp_path, tests)


def _collected_fields() -> dict[str, str]:
    fields = {}
    for line in COUNTERS.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "{")):
            name, kind, _ = (part.strip() for part in line.split(",", 2))
            fields[name] = kind
    return fields


def test_dcgm_expressions_read_fields_the_exporter_collects():
    fields = _collected_fields()
    assert not any(name.startswith("DCGM_FI_PROF_") for name in fields), "DCP needs SYS_ADMIN"
    used = {
        name
        for e in promql.expressions()
        for name in promql.metric_names(e.expr)
        if name.startswith("DCGM_")
    }
    assert used, "no DCGM expressions found"
    missing = sorted(n for n in used if fields.get(n) not in ("gauge", "counter"))
    assert not missing, f"not collected by dcgm-counters.csv.j2: {missing}"
    recorded = {s.name for s in promql.parse_exposition(DCGM_METRICS.read_text())}
    assert recorded <= set(fields)


# --- the dashboard -----------------------------------------------------------------------------


def test_dashboard_is_importable_as_is():
    dashboard = json.loads(promql.DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(promql._panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for variable in ("host", "model_name"):
        assert variables[variable]["datasource"]["uid"] == "${datasource}"
    titles = {p["title"] for p in panels}
    for wanted in [
        "Requests running",
        "Requests waiting",
        "Prompt tokens/s (in)",
        "Generated tokens/s (out)",
        "Time to first token (p50, p95, p99)",
        "End-to-end request latency (p50, p95, p99)",
        "KV-cache usage",
        "GPU utilisation",
        "GPU memory used",
        "GPU power",
        "GPU temperature",
    ]:
        assert wanted in titles


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query (Grafana variables substituted) as a recording rule."""
    queries = promql.dashboard_expressions(promql.DASHBOARD)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"servekit:dashboard:{i}",
                        "expr": promql.grafana_substitute(e.expr),
                    }
                    for i, e in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    _promtool_run("check", "rules", str(tmp_path / "dashboard.yml"))


# --- prometheus.yml from the inventory -----------------------------------------------------------


def _render_config(tmp_path: Path, inventory: dict, monitoring_host: str) -> dict:
    """prometheus.yml as the role writes it for ``monitoring_host`` (promtool-validated)."""
    rules = _rules_dir(tmp_path) / "servekit-alerts.yml"
    (tmp_path / "hosts.yml").write_text(json.dumps(inventory))
    playbook = [
        {
            "name": "Render",
            "hosts": monitoring_host,
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
            "tasks": [
                {
                    "name": "Render prometheus.yml",
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "prometheus.yml.j2"),
                        "dest": str(tmp_path / "prometheus.yml"),
                        "mode": "0644",
                        "validate": "promtool check config %s",
                    },
                    "vars": {"_monitoring_rules_file": str(rules)},
                }
            ],
        }
    ]
    (tmp_path / "render.yml").write_text(yaml.safe_dump(playbook))
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "render.yml")],
        env=_ansible_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return yaml.safe_load((tmp_path / "prometheus.yml").read_text())


def _targets(config: dict) -> dict[str, dict[str, str]]:
    """job -> host label -> target."""
    jobs = {}
    for job in config["scrape_configs"]:
        jobs[job["job_name"]] = {
            static["labels"]["host"]: target
            for static in job["static_configs"]
            for target in static["targets"]
        }
    return jobs


LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}


def test_scrape_targets_come_from_the_inventory(tmp_path):
    _promtool()
    inventory = {
        "all": {
            "children": {
                "gpu_hosts": {
                    "hosts": {
                        "gpu-1": {
                            "ansible_host": "10.0.0.11",
                            "vllm_service_bind_address": "0.0.0.0",
                            "monitoring_exporter_listen_address": "10.0.0.11",
                        },
                        # vLLM on one network, the exporters on another.
                        "gpu-2": {
                            "ansible_host": "10.0.0.12",
                            "vllm_service_bind_address": "10.0.1.12",
                            "vllm_service_port": 8001,
                            "monitoring_exporter_listen_address": "10.0.2.12",
                        },
                        # Reached through another address than the one it listens on (NAT).
                        "cpu-1": {
                            "ansible_host": "10.0.0.13",
                            "servekit_accelerator": "cpu",
                            "monitoring_target_address": "192.168.5.13",
                            "monitoring_exporter_listen_address": "10.0.0.13",
                        },
                    }
                },
                "monitoring": {"hosts": {"mon-1": {"ansible_host": "10.0.0.20", **LOCAL}}},
            }
        }
    }
    jobs = _targets(_render_config(tmp_path, inventory, "mon-1"))
    assert jobs["vllm"] == {
        "gpu-1": "10.0.0.11:8000",
        "gpu-2": "10.0.1.12:8001",
        "cpu-1": "192.168.5.13:8000",
    }
    # The exporters on their monitoring address; the Prometheus host's own on loopback (the
    # default), which only it reaches.
    assert jobs["node"] == {
        "gpu-1": "10.0.0.11:9100",
        "gpu-2": "10.0.2.12:9100",
        "cpu-1": "192.168.5.13:9100",
        "mon-1": "127.0.0.1:9100",
    }
    # No DCGM exporter on a CPU host.
    assert jobs["dcgm"] == {"gpu-1": "10.0.0.11:9400", "gpu-2": "10.0.2.12:9400"}
    assert jobs["prometheus"] == {"mon-1": "127.0.0.1:9090"}


def test_prometheus_on_a_loopback_vllm_host_scrapes_it_on_loopback(tmp_path):
    """The sandbox's shape: one CPU host serving on 127.0.0.1 and running Prometheus."""
    _promtool()
    host = {"ansible_host": "10.0.0.30", "servekit_accelerator": "cpu", **LOCAL}
    inventory = {
        "all": {
            "children": {
                "gpu_hosts": {"hosts": {"box": host}},
                "monitoring": {"hosts": {"box": host}},
            }
        }
    }
    config = _render_config(tmp_path, inventory, "box")
    jobs = _targets(config)
    assert jobs["vllm"] == {"box": "127.0.0.1:8000"}
    # The exporters stay on loopback (monitoring_exporter_listen_address's default).
    assert jobs["node"] == {"box": "127.0.0.1:9100"}
    assert "dcgm" not in jobs
    assert config["global"]["scrape_interval"] == "15s"


# --- the exporters listen on the monitoring address ----------------------------------------------

PINNED_DCGM = "nvcr.io/nvidia/k8s/dcgm-exporter:4.4.1-4.5.2-ubuntu22.04@sha256:" + "ab" * 32


def _node_exporter_args(**variables) -> list[str]:
    text = render("prometheus-node-exporter.default.j2", role=ROLE, **variables)
    [line] = [line for line in text.splitlines() if line.startswith("ARGS=")]
    # systemd reads the quoted value, and the unit's $ARGS splits it at white space.
    [value] = shlex.split(line.removeprefix("ARGS="))
    return value.split()


def test_exporters_listen_on_loopback_by_default():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert defaults["monitoring_exporter_listen_address"] == "127.0.0.1"
    vars_text = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    # Prometheus and preflight read other hosts' addresses with this stand-in for the default.
    assert vars_text["_monitoring_exporter_default_address"] == "127.0.0.1"
    listen = [a for a in _node_exporter_args() if a.startswith("--web.listen-address")]
    assert listen == ["--web.listen-address=127.0.0.1:9100"]
    unit = render("dcgm-exporter.service.j2", role=ROLE, monitoring_dcgm_exporter_image=PINNED_DCGM)
    assert re.findall(r"--publish \S+", unit) == ["--publish 127.0.0.1:9400:9400"], unit


@pytest.mark.parametrize(("address", "port"), [("10.0.0.11", 9100), ("192.0.2.7", 19100)])
def test_node_exporter_listens_on_the_monitoring_address_only(address, port):
    args = _node_exporter_args(
        monitoring_exporter_listen_address=address, monitoring_node_exporter_port=port
    )
    assert [a for a in args if a.startswith("--web.listen-address")] == [
        f"--web.listen-address={address}:{port}"
    ]


@pytest.mark.parametrize(("address", "port"), [("10.0.0.11", 9400), ("192.0.2.7", 19400)])
def test_dcgm_exporter_is_published_on_the_monitoring_address_only(address, port):
    unit = render(
        "dcgm-exporter.service.j2",
        role=ROLE,
        monitoring_exporter_listen_address=address,
        monitoring_dcgm_exporter_port=port,
        monitoring_dcgm_exporter_image=PINNED_DCGM,
    )
    assert re.findall(r"--publish \S+", unit) == [f"--publish {address}:{port}:9400"], unit


def test_readiness_waits_probe_the_monitoring_address():
    handlers = yaml.safe_load((ROLE / "handlers" / "main.yml").read_text())
    urls = {
        h["name"]: h["ansible.builtin.uri"]["url"] for h in handlers if "ansible.builtin.uri" in h
    }
    for name in ("Wait until node exporter answers", "Wait until dcgm exporter answers"):
        assert urls[name].startswith("http://{{ _monitoring_exporter_address }}:"), urls[name]
    # The firewall is reloaded before the exporters restart on a new address (handler order).
    names = [h["name"] for h in handlers]
    assert names.index("Reload exporters firewall") < names.index("Restart node exporter")
    assert names.index("Reload exporters firewall") < names.index("Restart dcgm exporter")


# --- tests/promql.py -----------------------------------------------------------------------------


def test_expressions_lists_every_panel_query_and_alert():
    found = promql.expressions(promql.DASHBOARD, promql.RULES_TEMPLATE)
    rules = [e for e in found if e.source == "rules"]
    panels = [e for e in found if e.source == "dashboard"]
    assert {e.name for e in rules} == ALERTS
    dashboard = json.loads(promql.DASHBOARD.read_text())
    targets = sum(len(p.get("targets", [])) for p in promql._panels(dashboard["panels"]))
    assert len(panels) == targets
    assert all(e.concerns and e.concerns <= {"vllm", "host", "dcgm"} for e in found)
    by_name = {e.name: e for e in found}
    assert by_name["VllmDown"].concerns == {"vllm"}
    assert by_name["ModelDiskNearlyFull"].concerns == {"host"}
    assert by_name["GpuXidError"].concerns == {"dcgm"}
    assert by_name["KV-cache usage [A]"].concerns == {"vllm"}


def test_expressions_reads_a_rendered_rules_file_too(tmp_path):
    rendered = _rules_dir(tmp_path) / "servekit-alerts.yml"
    assert promql.rule_expressions(rendered) == promql.rule_expressions(promql.RULES_TEMPLATE)


def test_classify():
    assert promql.classify('up{job="vllm"} == 0') == {"vllm"}
    assert promql.classify('up{job="node"}') == {"host"}
    assert promql.classify("rate(vllm:prompt_tokens_total[5m])") == {"vllm"}
    assert promql.classify("DCGM_FI_DEV_GPU_TEMP > 85") == {"dcgm"}
    assert promql.classify("node_filesystem_avail_bytes * servekit_x") == {"host"}
    assert promql.classify("vllm:num_requests_running and DCGM_FI_DEV_GPU_UTIL") == {
        "vllm",
        "dcgm",
    }


def test_grafana_substitute():
    expr = 'rate(vllm:x{host=~"$host", model_name=~"${model_name}"}[$__rate_interval])'
    assert promql.grafana_substitute(expr) == 'rate(vllm:x{host=~".*", model_name=~".*"}[1m])'
    assert promql.grafana_substitute(expr, {"host": "gpu-1"}, "5m") == (
        'rate(vllm:x{host=~"gpu-1", model_name=~".*"}[5m])'
    )
    with pytest.raises(KeyError, match=r"\$nope"):
        promql.grafana_substitute("up{x=~'$nope'}")


def test_parse_exposition():
    text = (
        "# HELP a A.\n# TYPE a gauge\n"
        'a{x="q\\"w\\\\", y=""} 1.5\n'
        "b 2 1700000000000\n"
        'c_bucket{le="+Inf"} +Inf\n'
    )
    samples = promql.parse_exposition(text)
    assert [(s.name, s.labels, s.value) for s in samples[:2]] == [
        ("a", {"x": 'q"w\\', "y": ""}, 1.5),
        ("b", {}, 2.0),
    ]
    assert samples[2].value == float("inf")
    series = promql.promtool_input_series(samples[:1], {"job": "j"}, steps=3)
    assert series == [{"series": 'a{job="j", x="q\\"w\\\\", y=""}', "values": "1.5x3"}]
    with pytest.raises(ValueError):
        promql.parse_exposition("not a sample line at all {")


# --- preflight: can Prometheus read every server's /metrics? ------------------------------------

GOOD = {
    "vllm_service_bind_address": "0.0.0.0",
    "vllm_service_metrics_allowed_cidrs": ["10.0.0.20/32"],
    "monitoring_exporter_listen_address": "10.0.0.12",
}


@pytest.mark.parametrize(
    ("gpu_2", "refused"),
    [
        (GOOD, None),
        ({**GOOD, "vllm_service_metrics_public": True}, None),
        ({"monitoring_target_address": "10.9.9.9", **GOOD}, None),
        (
            {"monitoring_exporter_listen_address": "10.0.0.12"},
            "gpu-2 publish vLLM on loopback only (vllm_service_bind_address",
        ),
        (
            {
                "vllm_service_bind_address": "0.0.0.0",
                "monitoring_exporter_listen_address": "10.0.0.12",
            },
            "gpu-2 answer /metrics only to themselves (vllm_service_metrics_public is false and"
            " vllm_service_metrics_allowed_cidrs is empty), so Prometheus on mon-1 would get 403:"
            " add mon-1's address, as those hosts see it, to vllm_service_metrics_allowed_cidrs,"
            ' e.g. vllm_service_metrics_allowed_cidrs: ["10.0.0.20/32"]',
        ),
        (
            {
                key: value
                for key, value in GOOD.items()
                if key != "monitoring_exporter_listen_address"
            },
            "gpu-2 keep node_exporter and the DCGM exporter on loopback"
            " (monitoring_exporter_listen_address, default 127.0.0.1), so Prometheus on mon-1"
            " cannot scrape them",
        ),
    ],
    ids=[
        "reachable",
        "metrics-public",
        "target-address",
        "loopback-only",
        "metrics-private",
        "exporters-on-loopback",
    ],
)
def test_preflight_refuses_servers_prometheus_cannot_read(tmp_path, gpu_2, refused):
    inventory = {
        "all": {
            "children": {
                "gpu_hosts": {"hosts": {"gpu-1": GOOD, "gpu-2": gpu_2}},
                "monitoring": {"hosts": {"mon-1": {"ansible_host": "10.0.0.20", **LOCAL}}},
            }
        }
    }
    (tmp_path / "hosts.yml").write_text(json.dumps(inventory))
    playbook = [
        {
            "name": "Preflight",
            "hosts": "monitoring",
            "gather_facts": True,
            "tasks": [
                {
                    "name": "Check",
                    "ansible.builtin.include_role": {
                        "name": "monitoring",
                        "tasks_from": "preflight",
                    },
                }
            ],
        }
    ]
    (tmp_path / "preflight.yml").write_text(yaml.safe_dump(playbook))
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "preflight.yml")],
        env=_ansible_env(tmp_path) | {"ANSIBLE_CALLBACK_RESULT_FORMAT": "json"},
        capture_output=True,
        text=True,
        check=False,
    )
    if refused is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0, proc.stdout
        fatal = next(line for line in proc.stdout.splitlines() if line.startswith("fatal: [mon-1]"))
        message = json.loads(fatal.split(" => ", 1)[1])["msg"]
        assert refused in message, message
        assert "gpu-1" not in message, message

"""Report tests: the terminal table, the JSON report and the JUnit XML."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

from servekit.probe import ProbeResult, ProbeRun
from servekit.probe.report import render_table, write_reports

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sample_runs() -> list[ProbeRun]:
    good = ProbeRun(
        target="sandbox-1",
        base_url="http://127.0.0.1:8000",
        model="Qwen3-8B",
        seconds=1.5,
        results=[
            ProbeResult("health", True, "HTTP 200", 0.004),
            ProbeResult("chat", True, "finish length; usage 14+32=46", 0.52),
            ProbeResult("reasoning", True, "no reasoning parser configured", 0.0, skipped=True),
        ],
    )
    bad = ProbeRun(
        target="gpu-2",
        base_url="http://10.0.0.2:8000",
        model="Qwen3-8B",
        seconds=0.2,
        results=[
            ProbeResult("health", True, "HTTP 200", 0.01),
            ProbeResult(
                "chat_stream",
                False,
                "expected the stream to end with `data: [DONE]`, got 34 events ending with "
                + "x" * 300,
                0.13,
            ),
            ProbeResult("metrics", False, 'control \x00\x1b chars & <tags> "quoted"', 0.02),
            ProbeResult("auth", True, "no API key given", 0.0, skipped=True),
        ],
    )
    return [good, bad]


def test_table_lists_checks_results_and_summaries():
    text = render_table(sample_runs(), color=False, width=100)
    assert not ANSI.search(text)
    assert "\x1b" not in text and "\x00" not in text  # server text cannot drive the terminal
    for word in ("sandbox-1", "gpu-2", "health", "chat_stream", "reasoning"):
        assert word in text
    for status in ("PASS", "FAIL", "SKIP"):
        assert status in text
    assert "check" in text and "result" in text and "detail" in text
    assert "sandbox-1: PASS  2 passed, 0 failed, 1 skipped" in text
    assert "gpu-2: FAIL  1 passed, 2 failed, 1 skipped" in text
    assert "overall: FAIL  1 of 2 targets ok (3 passed, 2 failed, 2 skipped)" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    # a long failure detail wraps over a few lines and is then cut
    assert "expected the stream to end with `data: [DONE]`" in text
    assert "…" in text


def test_table_colours_only_when_asked(monkeypatch):
    runs = sample_runs()
    coloured = render_table(runs, color=True, width=100)
    assert "\x1b[32m" in coloured and "\x1b[31m" in coloured
    assert ANSI.sub("", coloured) == render_table(runs, color=False, width=100)
    # auto: not a terminal under pytest's capture -> no colour
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert not ANSI.search(render_table(runs, width=100))


def test_table_of_passing_runs_says_pass():
    text = render_table(sample_runs()[:1], color=False, width=100)
    last = text.rstrip().splitlines()[-1]
    assert last == "overall: PASS  1 of 1 targets ok (2 passed, 0 failed, 1 skipped)"


def test_json_report_structure(tmp_path):
    paths = write_reports(sample_runs(), tmp_path / "reports")
    assert paths["json"] == tmp_path / "reports" / "probes.json"
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert set(data) >= {"generated_at", "targets", "ok"}
    assert data["ok"] is False
    assert [t["target"] for t in data["targets"]] == ["sandbox-1", "gpu-2"]
    first = data["targets"][0]
    assert first["base_url"] == "http://127.0.0.1:8000"
    assert first["ok"] is True
    assert first["results"][0] == {
        "name": "health",
        "status": "PASS",
        "ok": True,
        "skipped": False,
        "seconds": 0.004,
        "detail": "HTTP 200",
    }
    assert first["results"][2]["status"] == "SKIP"
    assert data["targets"][1]["counts"] == {"PASS": 1, "FAIL": 2, "SKIP": 1}


def test_junit_parses_and_counts(tmp_path):
    paths = write_reports(sample_runs(), tmp_path, basename="verify")
    assert paths["junit"] == tmp_path / "verify.junit.xml"
    root = ET.parse(paths["junit"]).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("7", "2", "2")
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["sandbox-1", "gpu-2"]
    bad = suites[1]
    assert (bad.get("tests"), bad.get("failures"), bad.get("skipped")) == ("4", "2", "1")
    cases = bad.findall("testcase")
    assert [c.get("name") for c in cases] == ["health", "chat_stream", "metrics", "auth"]
    assert {c.get("classname") for c in cases} == {"probes.gpu-2"}
    assert cases[1].get("time") == "0.130"
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("message").startswith("expected the stream")
    # characters XML cannot carry are replaced, markup is escaped
    assert cases[2].find("failure").get("message") == 'control \ufffd\ufffd chars & <tags> "quoted"'
    assert cases[3].find("skipped").get("message") == "no API key given"
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    props = {p.get("name"): p.get("value") for p in bad.iter("property")}
    assert props == {"base_url": "http://10.0.0.2:8000", "model": "Qwen3-8B"}


def test_reports_of_no_runs(tmp_path):
    paths = write_reports([], tmp_path)
    assert json.loads(paths["json"].read_text())["ok"] is False
    assert ET.parse(paths["junit"]).getroot().get("tests") == "0"
    assert "overall: FAIL  0 of 0 targets ok" in render_table([], color=False)

"""Shared helpers of the sandbox end-to-end tests."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventory" / "sandbox" / "hosts.yml"
BASE_URL = "http://localhost:8000"
HOST_CONTAINER = "servekit-sandbox-1"


def ansible_playbook(
    log_name: str,
    playbook: str = "site.yml",
    *extra: str,
    expect_ok: bool = True,
    inventory: Path = INVENTORY,
) -> str:
    """Runs a playbook on the sandbox like `make deploy` does; returns the output."""
    env = dict(
        os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible" / "ansible.cfg"), ANSIBLE_NOCOLOR="1"
    )
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    log = ROOT / "reports" / f"{log_name}.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(
            [
                f"{bindir}/ansible-playbook",
                "-i",
                str(inventory),
                f"ansible/playbooks/{playbook}",
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
        )
    output = log.read_text()
    if expect_ok:
        assert proc.returncode == 0, f"ansible-playbook failed (log {log}):\n{output[-6000:]}"
    else:
        assert proc.returncode != 0, f"ansible-playbook should have failed (log {log})"
    return output


def recap(output: str) -> dict[str, dict[str, int]]:
    hosts = {}
    for line in output.split("PLAY RECAP", 1)[1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(ok=\d+.*)$", line.strip())
        if m:
            hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return hosts


def on_host(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "exec", HOST_CONTAINER, *args], capture_output=True, text=True, check=False
    )


def vllm_identity() -> tuple[str, str]:
    """(systemd invocation id, container id): both change on any restart."""
    invocation = on_host("systemctl", "show", "vllm", "--property=InvocationID", "--value").stdout
    container = on_host("docker", "inspect", "--format", "{{.Id}}", "vllm").stdout
    return invocation.strip(), container.strip()


def healthy(timeout: float = 2.0) -> bool:
    try:
        return requests.get(f"{BASE_URL}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def started_and_healthy() -> bool:
    """/health answers and vllm.service has finished starting (the health timer applies)."""
    active = on_host("systemctl", "is-active", "vllm").stdout.strip() == "active"
    return active and healthy()


def wait_for(predicate, what: str, deadline_s: float, interval: float = 0.5) -> float:
    """Polls until predicate() is true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - start
        assert elapsed < deadline_s, f"{what}: not within {deadline_s:.0f} s"
        time.sleep(interval)
    return time.monotonic() - start


def push_relabelled(state, tag: str, label: str) -> str:
    """The sandbox's vLLM image with one more label (a new digest over the same layers: a new
    release, quick to push and to pull), pushed to the sandbox registry as ``tag``; its digest."""
    from servekit.sandbox import registry
    from servekit.sandbox.common import docker_client

    client = docker_client()
    local = state.registry["local"]
    repo = registry.vllm_registry_repo(local)
    dockerfile = f"FROM {state.images['vllm-cpu']}\nLABEL {label}\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repo}:{tag}", rm=True)
    push_tag(client, repo, tag)
    digest = registry.registry_digest(local, "servekit/vllm-cpu", tag)
    assert digest, f"the registry does not list the pushed {repo}:{tag}"
    return digest


def push_tag(client, repo: str, tag: str) -> None:
    for chunk in client.api.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in chunk, chunk["error"]


# vLLM logs every route it mounts at start-up: "Route: /v1/models, Methods: GET, HEAD".
ROUTE_LINE = re.compile(r"Route: (?P<path>/\S*), Methods: (?P<methods>[A-Z]+(?:, [A-Z]+)*)")
# Mounted apps are not in that list: the metrics, and paths that once slipped past a guard.
UNLISTED = [("GET", "/metrics"), ("GET", "/metricsx"), ("GET", "/metrics/")]


def served_routes(container: str = HOST_CONTAINER) -> list[tuple[str, str]]:
    """(method, path) of every route the server on ``container`` mounts, read from the list it
    logs at start-up (path parameters filled in), plus the mounted metrics app."""
    journal = subprocess.run(
        ["docker", "exec", container, "journalctl", "-u", "vllm", "-o", "cat", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = set(UNLISTED)
    for m in ROUTE_LINE.finditer(journal):
        path = re.sub(r"\{[^}]*\}", "x", m["path"])
        found |= {(method, path) for method in m["methods"].split(", ") if method != "HEAD"}
    assert len(found) > 20, (
        f"the server logged {len(found)} routes: is its start-up in the journal?"
    )
    return sorted(found)


def scan_routes(
    base_url: str, routes: list[tuple[str, str]], key: str | None = None
) -> dict[str, int]:
    """Each route's HTTP status, asked with an empty JSON body (POST) and the key if given."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with requests.Session() as session:
        return {
            f"{method} {path}": session.request(
                method,
                base_url + path,
                json={} if method != "GET" else None,
                headers=headers,
                timeout=30,
            ).status_code
            for method, path in routes
        }


# The default allow-list (vllm_service_allowed_routes, gateway_allowed_routes): these need the
# key when one is set; /health, /ping and /version never do; everything else is 404.
KEYED_ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"}
OPEN_ROUTES = {"/health", "/ping", "/version"}


def unexpected_answers(scan: dict[str, int], metrics: int) -> dict[str, int]:
    """What a scan without the key got that a closed server must not answer: 401 on the keyed
    routes, 404 off the list, ``metrics`` on /metrics; the open routes answer (200, or 405 for
    a method they lack)."""
    wrong = {}
    for route, status in scan.items():
        path = route.split(" ", 1)[1]
        if path in OPEN_ROUTES:
            expected = {200, 405}
        elif path == "/metrics":
            expected = {metrics}
        else:
            expected = {401} if path in KEYED_ROUTES else {404}
        if status not in expected:
            wrong[route] = status
    return wrong


def write_scan_report(name: str, scan: dict[str, int]) -> None:
    report = ROOT / "reports" / f"{name}.json"
    report.parent.mkdir(exist_ok=True)
    report.write_text(json.dumps(scan, indent=2, sort_keys=True) + "\n")


def failed_checks(result) -> set[str]:
    """Names of the failed host checks (test function) and request probes of a verify run."""
    names = {t.name.split("::")[-1] for h in result.hosts for t in h.tests if t.status == "FAIL"}
    names |= {r.name for run in result.runs for r in run.results if not r.ok and not r.skipped}
    return names


class FirstFailure:
    """Polls /health from the moment it is entered; ``at`` is when it first failed (None
    while it never has): detection measured, not assumed."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.at = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> FirstFailure:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.at is None:
            if not healthy(timeout=1.0):
                self.at = time.monotonic()
            self._stop.wait(self.interval)

"""The gateway role without a sandbox: its input checks, the HAProxy configuration it renders
(checked with `haproxy -c`, as its template task does), and that configuration running in the
real HAProxy (Debian's 2.6) in front of two fake vLLM servers on this machine: active health
checks, retries, the edge API key, /metrics refused, streaming, and drain through the runtime
API helper the rolling update uses (surviving a reload).

The role is rendered by `ansible-playbook` on a local connection into a temporary directory;
paths the role keeps under /etc and /run are moved there with extra variables. The live tests
need the `haproxy` binary (`apt-get install haproxy`) and are skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import requests
from fake_backend import MODEL
from gateway_helpers import HAPROXY, HELPER, KEY, Gateway, Run, render

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed")

# ---------------------------------------------------------------------- input checks


BAD = [
    ("port-too-big", {"gateway_port": 70000}, None, "gateway_port=70000", "from 1 to 65535"),
    ("stats-port-same", {"gateway_stats_port": 18000}, None, "gateway_stats_port", "other than"),
    ("bind-host-name", {"gateway_bind_address": "gw.lan"}, None, "gateway_bind_address", "0.0.0.0"),
    (
        "timeout-words",
        {"gateway_timeout_server": "ten minutes"},
        None,
        "gateway_timeout_server",
        '"600s"',
    ),
    ("retries-50", {"gateway_retries": 50}, None, "gateway_retries=50", "from 0 to 10"),
    ("key-with-space", {"gateway_api_key": "sk a b"}, None, "gateway_api_key", "without them"),
    (
        "metrics-string",
        {"gateway_expose_metrics": "false"},
        None,
        "gateway_expose_metrics",
        "without quotes",
    ),
    ("balance-fastest", {"gateway_balance": "fastest"}, None, "gateway_balance", "leastconn"),
    ("no-backends", {"gateway_backend_group": "nope"}, None, "gateway_backend_group", "put the"),
    (
        "backend-on-loopback-only",
        {},
        {"b2": {"vllm_service_bind_address": "127.0.0.1", "ansible_host": "10.0.0.2"}},
        "vllm_service_bind_address",
        "b2 at 10.0.0.2",
    ),
    (
        "loopback-address-of-another-machine",
        {},
        {"b1": {"ansible_port": 2223}},
        "servekit_gateway_backend_address",
        "b1 at 127.0.0.1",
    ),
    (
        "open-without-any-key",
        {"gateway_bind_address": "0.0.0.0"},
        None,
        "gateway_api_key",
        "gateway_allow_unauthenticated",
    ),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, Run]:
    from concurrent.futures import ThreadPoolExecutor

    def one(case, workdir) -> Run:
        _, gateway, backends, _, _ = case
        return render(workdir, backends=backends, **gateway)

    # Made here, not in the threads: pytest's temporary directories are not thread-safe.
    workdirs = [tmp_path_factory.mktemp(case[0]) for case in BAD]
    with ThreadPoolExecutor(max_workers=min(6, 2 * (os.cpu_count() or 1))) as pool:
        return dict(zip((c[0] for c in BAD), pool.map(one, BAD, workdirs), strict=True))


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_gateway_input_is_refused_before_anything_is_written(bad_runs, case, tmp_path):
    case_id, _, _, names, hint = case
    run = bad_runs[case_id]
    assert run.rc != 0, f"{case_id} was accepted\n{run.output[-3000:]}"
    message = run.failure()
    assert names in message and hint in message, message
    assert "Configuration, checked as the role checks it" not in run.output


def test_loopback_backends_on_the_gateways_own_machine_and_an_open_endpoint_that_says_so(tmp_path):
    run = render(tmp_path, gateway_bind_address="0.0.0.0", gateway_allow_unauthenticated=True)
    assert run.rc == 0, run.output[-3000:]
    assert "WARNING: gw publishes the gateway on 0.0.0.0:18000" in run.output


def test_rendered_configuration(tmp_path):
    run = render(
        tmp_path,
        ports=(9101, 9102),
        backends={"b2": {"servekit_gateway_backend_address": "fd00::2", "ansible_host": "h2"}},
        gateway_api_key=KEY,
        gateway_timeout_server="900s",
        gateway_retries=3,
    )
    assert run.rc == 0, run.output[-3000:]
    cfg = (tmp_path / "haproxy.cfg").read_text()
    assert "server b1 127.0.0.1:9101\n" in cfg
    assert "server b2 [fd00::2]:9102\n" in cfg
    assert "option httpchk GET /health" in cfg and "http-check expect status 200" in cfg
    assert "retries 3\n" in cfg and "retry-on conn-failure empty-response response-timeout" in cfg
    assert "timeout server 900s" in cfg and "hard-stop-after 900s" in cfg
    assert "balance leastconn" in cfg
    assert "path,url_dec -m beg /metrics" in cfg
    # The key is in its own 0600 file, never in the configuration.
    assert KEY not in cfg and "http_auth_bearer -m str -f" in cfg
    keys = tmp_path / "keys.lst"
    assert KEY in keys.read_text().splitlines()
    assert keys.stat().st_mode & 0o777 == 0o600
    assert KEY not in run.output

    exposed = render(tmp_path / "exposed", gateway_expose_metrics=True)
    assert exposed.rc == 0, exposed.output[-3000:]
    cfg = (tmp_path / "exposed" / "haproxy.cfg").read_text()
    assert "/metrics" not in cfg.split("frontend servekit", 1)[1].split("backend vllm", 1)[0]
    assert "http_auth_bearer" not in cfg  # no key: no check at the edge


# ---------------------------------------------------------------------- live HAProxy


@pytest.fixture
def gateway(live, backends) -> Iterator[Gateway]:
    """Each test starts from both servers healthy, in rotation, and leaves them so."""
    for name, backend in backends.items():
        backend.reset()
        live.api("ready", name)
        live.wait_until(lambda n=name: live.server(n)["up"], f"{name} up")
    yield live
    for backend in backends.values():
        backend.mode = "ok"
        backend._release.set()


@needs_haproxy
def test_requests_are_spread_and_streams_pass_through_unbuffered(gateway, backends):
    before = {n: gateway.server(n)["requests"] for n in ("b1", "b2")}
    servers = [gateway.chat().json()["server"] for _ in range(8)]
    assert set(servers) == {"b1", "b2"}, servers
    after = {n: gateway.server(n)["requests"] for n in ("b1", "b2")}
    assert sum(after.values()) - sum(before.values()) == 8, (before, after)
    # In lockstep the server writes a chunk only once this client has read the one before:
    # a gateway that held chunks back would have the server wait in vain.
    resp = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": MODEL, "stream": True, "chunks": 3, "lockstep": True},
        headers={"Authorization": f"Bearer {KEY}"},
        stream=True,
        timeout=60,
    )
    lines = []
    for line in resp.iter_lines(chunk_size=1):
        if line.startswith(b"data: {"):
            backends[json.loads(line.removeprefix(b"data: "))["server"]].acks.release()
        if line:
            lines.append(line)
    assert lines[-1] == b"data: [DONE]" and len(lines) == 4, lines
    server = json.loads(lines[0].removeprefix(b"data: "))["server"]
    assert backends[server].acked == [True, True, True], (
        f"the server waited in vain for the client to read a chunk: {backends[server].acked}"
    )


@needs_haproxy
def test_metrics_are_refused_and_the_key_is_checked_at_the_edge(gateway):
    for path in ("/metrics", "/metrics/", "/%6Detrics", "/metricsx"):
        resp = requests.get(f"{gateway.url}{path}", timeout=5)
        assert resp.status_code == 403, (path, resp.status_code, resp.text)
    assert requests.get(f"{gateway.url}/health", timeout=5).status_code == 200
    models = f"{gateway.url}/v1/models"
    assert requests.get(models, timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert requests.get(models, headers=wrong, timeout=5).json() == {"error": "Unauthorized"}
    right = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(models, headers=right, timeout=5).json()["data"][0]["id"] == MODEL
    assert gateway.chat(key=None).status_code == 401


@needs_haproxy
def test_a_server_failing_its_health_check_gets_no_requests(gateway, backends):
    backends["b2"].mode = "unhealthy"
    gateway.wait_until(lambda: not gateway.server("b2")["up"], "b2 taken out by its checks")
    assert {gateway.chat().json()["server"] for _ in range(6)} == {"b1"}
    backends["b2"].mode = "ok"
    gateway.wait_until(lambda: gateway.server("b2")["up"], "b2 back after its checks pass")


@needs_haproxy
def test_requests_a_server_drops_unanswered_are_retried_on_another(gateway, backends):
    backends["b2"].mode = "drop"
    before = backends["b2"].posts
    answers = [gateway.chat() for _ in range(8)]
    assert [r.status_code for r in answers] == [200] * 8
    assert {r.json()["server"] for r in answers} == {"b1"}
    assert backends["b2"].posts > before, "no request went to b2: nothing was retried"


@needs_haproxy
def test_a_request_on_a_server_that_dies_is_cut_and_retried_once_its_checks_fail(gateway, backends):
    gateway.api("drain", "b1")  # the request goes to b2
    b2 = backends["b2"]
    b2.mode = "hang"

    def die_once_it_holds_the_request() -> None:
        held = b2.hung.wait(30)
        gateway.api("ready", "b1")  # first: b1 must be there to take the request over
        if held:
            b2.mode = "unhealthy"

    threading.Thread(target=die_once_it_holds_the_request, daemon=True).start()
    resp = gateway.chat()
    assert b2.hung.is_set(), "the request never reached b2"
    assert resp.status_code == 200 and resp.json()["server"] == "b1", resp.text
    # b2 never answers: the gateway closed the request b2 held once b2 failed its checks (not
    # on a timeout, which would have failed the request) and sent it to b1.
    assert b2.cut.wait(10), "the gateway never closed the request b2 held"


@needs_haproxy
def test_drain_keeps_new_requests_away_survives_a_reload_and_ready_puts_back(gateway):
    drained = json.loads(gateway.api("drain", "b2").stdout)
    assert drained["drain"] and drained["up"]
    assert {gateway.chat().json()["server"] for _ in range(6)} == {"b1"}
    idle = json.loads(gateway.api("--timeout", "5", "wait-idle", "b2").stdout)
    assert idle["sessions"] == 0
    gateway.reload()
    assert gateway.server("b2")["drain"], "the drain was lost in the reload"
    assert {gateway.chat().json()["server"] for _ in range(6)} == {"b1"}
    assert not json.loads(gateway.api("ready", "b2").stdout)["drain"]
    assert {gateway.chat().json()["server"] for _ in range(8)} == {"b1", "b2"}


@needs_haproxy
def test_the_helper_says_which_server_it_does_not_know(gateway, tmp_path):
    unknown = gateway.api("drain", "gpu-99", check=False)
    assert unknown.returncode == 3 and "no server gpu-99" in unknown.stderr
    gone = subprocess.run(
        [sys.executable, str(HELPER), "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert gone.returncode == 2 and "cannot talk to HAProxy" in gone.stderr

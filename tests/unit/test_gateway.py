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

import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_backend import MODEL
from gateway_helpers import HAPROXY, HELPER, KEY, Gateway, Run, render, start_live_gateway

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
    # Keys on the servers leave /health-style routes and anything the servers let through
    # open at the edge: the gateway itself needs one.
    (
        "open-with-keyed-backends",
        {"gateway_bind_address": "0.0.0.0"},
        {"b1": {"vllm_service_api_key": "k" * 40}, "b2": {"vllm_service_api_key": "k" * 40}},
        "gateway_api_key is empty",
        "bind to 127.0.0.1",
    ),
    ("short-key", {"gateway_api_key": "sk-short"}, None, "gateway_api_key has 8", "32 or more"),
    (
        "routes-without-health",
        {"gateway_allowed_routes": ["/v1/models"]},
        None,
        "gateway_allowed_routes lacks /health",
        "add /health",
    ),
    (
        "routes-a-string",
        {"gateway_allowed_routes": "/health,/v1/models"},
        None,
        "gateway_allowed_routes=",
        "YAML list",
    ),
    (
        "routes-escape",
        {"gateway_allowed_routes": ["/health", "/v1/../tokenize"]},
        None,
        "gateway_allowed_routes=",
        "no '..'",
    ),
    (
        "routes-metrics",
        {"gateway_allowed_routes": ["/health", "/metrics"]},
        None,
        "gateway_allowed_routes lists /metrics",
        "gateway_expose_metrics: true",
    ),
    (
        "tls-not-pem",
        {"gateway_tls_certificate": "not a certificate"},
        None,
        "gateway_tls_certificate",
        "one PEM",
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
    assert "acl servekit_metrics path /metrics" in cfg
    frontend = cfg.split("frontend servekit", 1)[1].split("backend vllm", 1)[0]
    assert "acl servekit_route path /v1/models /v1/chat/completions /v1/completions " in frontend
    assert "if !servekit_route or servekit_dotdot" in frontend
    # The key is in its own 0600 file, never in the configuration.
    assert KEY not in cfg and "http_auth_bearer -m str -f" in cfg
    keys = tmp_path / "keys.lst"
    assert KEY in keys.read_text().splitlines()
    assert keys.stat().st_mode & 0o777 == 0o600
    assert KEY not in run.output

    exposed = render(tmp_path / "exposed", gateway_expose_metrics=True)
    assert exposed.rc == 0, exposed.output[-3000:]
    cfg = (tmp_path / "exposed" / "haproxy.cfg").read_text()
    frontend = cfg.split("frontend servekit", 1)[1].split("backend vllm", 1)[0]
    assert "status 403" not in frontend and "if !servekit_route !servekit_metrics" in frontend
    assert "http_auth_bearer" not in cfg  # no key: no check at the edge
    assert " ssl crt " not in cfg and not (tmp_path / "exposed" / "tls.pem").exists()


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


# Paths the stand-in servers answer 200 to, which the default allow-list leaves out; and
# allowed ones written so that a naive match would pass them.
OFF_THE_LIST = [
    "/invocations",
    "/pooling",
    "/score",
    "/scale_elastic_ep",
    "/load",
    "/docs",
    "/openapi.json",
    "/server_info",
    "/v1/embeddings",
    "/metricsx",
    "/metrics/",
    "/%6Detrics",
    "/v1/%6Dodels",
    "/v1/models/",
    "//v1/models",
    "/v1/models/%2e%2e/%2e%2e/load",
    "/",
]


@needs_haproxy
@pytest.mark.parametrize("path", OFF_THE_LIST)
def test_routes_off_the_list_never_reach_a_server(gateway, path):
    before = {n: gateway.server(n)["requests"] for n in ("b1", "b2")}
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
        for method in ("GET", "POST"):
            # http.client sends the path as written (requests would normalise %6D to m).
            conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
            try:
                conn.request(
                    method, path, body=b"{}" if method == "POST" else None, headers=headers
                )
                resp = conn.getresponse()
                assert resp.status == 404, (method, path, resp.status, resp.read())
            finally:
                conn.close()
    assert {n: gateway.server(n)["requests"] for n in ("b1", "b2")} == before


@needs_haproxy
def test_metrics_are_refused_and_the_key_is_checked_at_the_edge(gateway):
    resp = requests.get(f"{gateway.url}/metrics", timeout=5)
    assert resp.status_code == 403, (resp.status_code, resp.text)
    for path in ("/ping", "/version"):
        assert requests.get(f"{gateway.url}{path}", timeout=5).status_code == 200, path
    for path in ("/tokenize", "/detokenize", "/v1/completions"):
        resp = requests.post(f"{gateway.url}{path}", json={}, timeout=5)
        assert resp.status_code == 401, (path, resp.status_code)
        assert resp.headers["WWW-Authenticate"] == "Bearer"
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


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl: (cert, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@needs_haproxy
def test_tls_at_the_edge_with_a_certificate_a_client_verifies(tmp_path, backends):
    cert, key = make_certificate(tmp_path, "gateway")
    other, _ = make_certificate(tmp_path, "someone-else")
    pem = cert.read_text() + key.read_text()
    tls = start_live_gateway(tmp_path / "tls", backends, gateway_tls_certificate=pem)
    try:
        cfg = (tmp_path / "tls" / "haproxy.cfg").read_text()
        assert " ssl crt " in cfg and "X-Forwarded-Proto https" in cfg
        assert (
            "PRIVATE KEY" not in cfg and "PRIVATE KEY" in (tmp_path / "tls" / "tls.pem").read_text()
        )
        assert (tmp_path / "tls" / "tls.pem").stat().st_mode & 0o777 == 0o600
        url = f"https://127.0.0.1:{tls.port}"
        right = {"Authorization": f"Bearer {KEY}"}
        models = requests.get(f"{url}/v1/models", headers=right, verify=str(cert), timeout=5)
        assert models.json()["data"][0]["id"] == MODEL
        assert requests.get(f"{url}/v1/models", verify=str(cert), timeout=5).status_code == 401
        assert (
            requests.get(f"{url}/load", headers=right, verify=str(cert), timeout=5).status_code
            == 404
        )
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{url}/health", verify=str(other), timeout=5)
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{tls.port}/health", timeout=5).raise_for_status()
    finally:
        tls.stop()

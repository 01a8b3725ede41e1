"""The fleet on the sandbox (`make test-fleet`): three sandbox GPU hosts behind the gateway host,
deployed by the same site.yml, clients on http://127.0.0.1:8080 (the gateway).

Under a steady load of chat completions through the gateway:

1. a GPU host is killed (its container gets SIGKILL: a power cut) -> no request fails: the
   gateway retries what the dead host did not answer on another host and its health checks
   take the host out; the host is then started again and returns to the gateway;
2. a rolling update of the vLLM image and a server flag (`make roll`) -> no request fails,
   streamed ones included: each host is drained before its restart and put back after
   requests verify it; afterwards every host runs the new image and flag;
3. a rolling update that breaks the server (an unknown flag) -> no request fails; the first
   host is rolled back to what it ran and put back, the roll-out stops there (the other hosts
   are never restarted), and the run fails naming the host.

The load sends non-streamed chats, plus streamed ones where no host dies: a stream that has
begun on a host that dies cannot be replayed by any proxy (the client has half an answer).

This module turns the sandbox into a fleet and removes it at the end. After the single-host
modules (`make test` runs it after them) it takes their host over as sandbox-1, as it is and
still serving (no port of a host moves in a fleet); the new hosts start with a copy of its vLLM
compile cache.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from sandbox_helpers import (
    ansible_playbook,
    push_relabelled,
    recap,
    scan_routes,
    served_routes,
    unexpected_answers,
    wait_for,
    write_scan_report,
)

from servekit.sandbox import fleet as sandbox_fleet
from servekit.sandbox import manager
from servekit.sandbox.registry import vllm_registry_repo
from servekit.sandbox.state import SandboxState, host_container
from servekit.verify import run_verify

pytestmark = pytest.mark.e2e

HOSTS = 3
GATEWAY_URL = f"http://127.0.0.1:{sandbox_fleet.GATEWAY_API_PORT}"
GATEWAY_CONTAINER = sandbox_fleet.GATEWAY_CONTAINER
HAPROXY_API = "/usr/local/libexec/servekit/haproxy-api"
START_BUDGET_S = 600
MODEL = "Qwen3-8B"


# ---------------------------------------------------------------------- helpers


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc


def on(container: str, *args: str) -> subprocess.CompletedProcess:
    return docker("exec", container, *args, check=False)


def power_cut(container: str) -> None:
    """SIGKILL a sandbox host. Docker 20.10 may answer "did not receive an exit event" while
    systemd and the nested containers are still being torn down: the kill has been sent, so
    poll until the container has stopped."""
    proc = docker("kill", "--signal", "KILL", container, check=False)
    assert proc.returncode == 0 or "did not receive an exit event" in proc.stderr, proc.stderr
    wait_for(
        lambda: docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "false",
        f"{container} stopped",
        60,
    )


def gateway_servers() -> dict[str, dict]:
    """The gateway's view of its backends (haproxy-api status on the gateway host)."""
    out = on(GATEWAY_CONTAINER, HAPROXY_API, "status")
    assert out.returncode == 0, out.stderr
    return {s["name"]: s for s in json.loads(out.stdout)}


def all_in_rotation() -> bool:
    try:
        servers = gateway_servers()
    except AssertionError:
        return False
    return len(servers) == HOSTS and all(
        s["up"] and not s["drain"] and not s["maint"] for s in servers.values()
    )


def vllm_identity(container: str) -> str:
    """systemd's InvocationID of vllm.service: changes on every (re)start."""
    return on(container, "systemctl", "show", "vllm", "--property=InvocationID", "--value").stdout


def unit_text(container: str) -> str:
    return on(container, "cat", "/etc/systemd/system/vllm.service").stdout


def running_image(container: str) -> str:
    fmt = "{{.Config.Image}}"
    return on(container, "docker", "inspect", "--format", fmt, "vllm").stdout.strip()


@dataclass
class Load:
    """Chat completions through the gateway from ``workers`` threads until stopped; every
    answer is judged (HTTP 200 and a complete completion or stream)."""

    url: str = GATEWAY_URL
    workers: int = 4
    stream_every: int = 0  # every n-th request streams (0: none)
    # A steady load, not a saturating one: on the sandbox's two CPU cores, CPU vLLMs kept busy
    # starve the host being restarted (a start that takes 35 s on a quiet machine took 4 to 5
    # minutes with 0.25 s pauses, 2.5 with 1 s). Four requests can still be in flight when a
    # host is drained or dies, which is what the tests are about.
    pause_s: float = 3.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    failed_sent_at: list[float] = field(default_factory=list)  # when each failed request left
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.workers):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)

    def wait_for_answers(self, n: int, deadline_s: float = 120) -> None:
        wait_for(lambda: self.ok >= n, f"{n} answers through the gateway", deadline_s)

    def _run(self, worker: int) -> None:
        session = requests.Session()
        count = 0
        while not self._stop.is_set():
            count += 1
            stream = bool(self.stream_every) and count % self.stream_every == 0
            sent_at = time.monotonic()
            try:
                detail = self._one(session, stream)
            except requests.RequestException as exc:
                detail = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.pause_s)
            with self._lock:
                if detail is None:
                    self.ok += 1
                else:
                    self.failed_sent_at.append(sent_at)
                    self.failures.append(
                        f"worker {worker}, {'stream' if stream else 'chat'}: {detail}"
                    )

    def _one(self, session: requests.Session, stream: bool) -> str | None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say something short."}],
            "max_tokens": 16,
            "chat_template_kwargs": {"enable_thinking": False},
            "stream": stream,
        }
        resp = session.post(
            f"{self.url}/v1/chat/completions", json=body, timeout=300, stream=stream
        )
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}: {resp.text[:200]}"
        if not stream:
            kind = resp.json().get("object")
            return None if kind == "chat.completion" else f"not a chat.completion: {kind}"
        events = [ln for ln in resp.iter_lines() if ln.startswith(b"data: ")]
        return None if events and events[-1] == b"data: [DONE]" else f"stream cut: {events[-1:]}"

    def summary(self) -> str:
        kinds = Counter(f.split(": ", 1)[-1][:60] for f in self.failures)
        return f"{self.ok} answered, {len(self.failures)} failed: {dict(kinds)}"


def second_image(state: SandboxState) -> str:
    """The sandbox's vLLM image with one more label, in the sandbox registry."""
    digest = push_relabelled(state, "rolling", "servekit.test.rolling=2")
    assert digest not in state.vllm_image, "the new image must have another digest"
    return f"{vllm_registry_repo(state.registry['remote'])}@{digest}"


# ---------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    state: SandboxState
    inventory: Path
    deploy_output: str


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    state = manager.up(hosts=HOSTS, gateway=True)
    assert state.inventory, "fleet mode writes an inventory"
    inventory = Path(state.inventory)
    output = ansible_playbook("fleet-deploy", "site.yml", inventory=inventory)
    yield Fleet(state, inventory, output)
    manager.down()


@pytest.fixture
def serving(fleet) -> Fleet:
    """Each test starts, and must end, with every host healthy and in rotation."""
    wait_for(all_in_rotation, "all hosts up and in rotation at the gateway", START_BUDGET_S)
    yield fleet
    wait_for(all_in_rotation, "all hosts up and in rotation after the test", START_BUDGET_S)


def test_fleet_deploys_and_verifies(serving, tmp_path):
    hosts = recap(serving.deploy_output)
    names = {f"sandbox-{n}" for n in range(1, HOSTS + 1)} | {sandbox_fleet.GATEWAY_HOSTNAME}
    assert set(hosts) == names, hosts
    assert all(h["failed"] == 0 and h["unreachable"] == 0 for h in hosts.values()), hosts
    assert requests.get(f"{GATEWAY_URL}/v1/models", timeout=10).json()["data"][0]["id"] == MODEL
    assert requests.get(f"{GATEWAY_URL}/metrics", timeout=10).status_code == 403
    before = {n: s["requests"] for n, s in gateway_servers().items()}
    for _ in range(3 * HOSTS):
        assert requests.get(f"{GATEWAY_URL}/v1/models", timeout=10).status_code == 200
    after = gateway_servers()
    assert all(after[n]["requests"] > before[n] for n in before), (before, after)
    result = run_verify(serving.inventory, tmp_path)
    assert result.ok, "make verify failed on the fleet (see the output above)"
    verified = json.loads((tmp_path / "verify.json").read_text())["hosts"]
    assert set(verified) == names


def test_the_gateway_forwards_only_the_allow_list_and_wants_its_key(serving):
    """The same scan as on a single host, through the gateway deployed with a key: the
    gateway answers 404 off the list and 401 without the key; only the health routes pass."""
    key = "sk-servekit-fleet-gateway-3c9e7a1f5b2d8e40"  # 40 characters
    keyed = json.dumps({"gateway_api_key": key})
    ansible_playbook("fleet-gateway-key", "gateway.yml", "-e", keyed, inventory=serving.inventory)
    try:
        before = {n: s["requests"] for n, s in gateway_servers().items()}
        scan = scan_routes(GATEWAY_URL, served_routes(manager.host_container(1)))
        write_scan_report("route-scan-gateway", scan)
        assert set(scan.values()) <= {200, 401, 403, 404, 405}, scan
        assert unexpected_answers(scan, metrics=403) == {}, scan
        forwarded = sum(s["requests"] - before[n] for n, s in gateway_servers().items())
        open_asked = sum(
            1 for route in scan if route.split(" ", 1)[1] in {"/health", "/ping", "/version"}
        )
        assert forwarded <= open_asked, f"{forwarded} requests reached a server, {open_asked} may"
        headers = {"Authorization": f"Bearer {key}"}
        models = requests.get(f"{GATEWAY_URL}/v1/models", headers=headers, timeout=10)
        assert models.json()["data"][0]["id"] == MODEL
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        chat = requests.post(
            f"{GATEWAY_URL}/v1/chat/completions", json=body, headers=headers, timeout=120
        )
        assert chat.status_code == 200, chat.text[:300]
    finally:
        restored = ansible_playbook(
            "fleet-gateway-open", "gateway.yml", inventory=serving.inventory
        )
    assert recap(restored)[sandbox_fleet.GATEWAY_HOSTNAME]["changed"] > 0
    assert requests.get(f"{GATEWAY_URL}/v1/models", timeout=10).status_code == 200


def test_killing_a_host_under_load_fails_no_request(serving):
    victim = host_container(2)
    try:
        with Load(workers=4) as load:
            load.wait_for_answers(20)
            power_cut(victim)
            stopped_at = time.monotonic()
            wait_for(
                lambda: not gateway_servers()["sandbox-2"]["up"], "the gateway takes it out", 60
            )
            taken_out_at = time.monotonic()
            # The two others carry the load: three more answers per client.
            load.wait_for_answers(load.ok + 3 * load.workers, deadline_s=60)
    finally:
        # Bring it back: start the container (vLLM comes back with it, enabled at boot); its
        # bridge address may change, so rewrite the inventory and reconfigure the gateway.
        docker("start", victim)
        state = manager.up(hosts=HOSTS, gateway=True)
        ansible_playbook("fleet-gateway-again", "gateway.yml", inventory=Path(state.inventory))
    # A request the dying host was answering is cut with it (a request sent to a machine that
    # is gone cannot be replayed): at most one per worker. Every request sent once the health
    # check took the host out is answered.
    after_removal = [t for t in load.failed_sent_at if t >= taken_out_at]
    assert not after_removal, load.summary()
    assert len(load.failures) <= load.workers, load.summary()
    taken_out_s = taken_out_at - stopped_at
    assert taken_out_s < 30, f"the gateway took {taken_out_s:.0f} s to take the dead host out"


def test_rolling_image_and_flag_update_under_load_fails_no_request(serving):
    image = second_image(serving.state)
    # A flag outside what vLLM keys its compile cache by (--max-num-seqs, for one, is in it and
    # would compile again on each host: a new release does, the relabelled image here does not).
    flag = ["--disable-fastapi-docs"]
    change = json.dumps({"vllm_service_image": image, "vllm_service_extra_args": flag})
    with Load(workers=4, stream_every=3) as load:
        load.wait_for_answers(20)
        output = ansible_playbook(
            "fleet-roll", "rolling.yml", "-e", change, inventory=serving.inventory
        )
    assert not load.failures, load.summary()
    assert load.ok > 50, load.summary()
    hosts = recap(output)
    assert all(h["failed"] == 0 for h in hosts.values()), hosts
    for n in range(1, HOSTS + 1):
        container = host_container(n)
        assert running_image(container) == image, f"{container} does not run the new image"
        exec_start = " ".join(unit_text(container).replace("\\\n", " ").split())
        assert "--disable-fastapi-docs" in exec_start, f"{container}: {exec_start[:600]}"
    # One host at a time: the batches are in the output in inventory order.
    drains = [
        line
        for line in output.splitlines()
        if line.startswith("TASK [") and "Take the host out of the gateway" in line
    ]
    assert len(drains) == HOSTS, output[-3000:]


def test_a_rolling_update_that_breaks_the_server_rolls_back_and_stops(serving):
    before = {n: vllm_identity(host_container(n)) for n in range(1, HOSTS + 1)}
    good_unit = unit_text(host_container(1))
    change = json.dumps({"vllm_service_extra_args": ["--no-such-flag"]})
    with Load(workers=4, stream_every=3) as load:
        load.wait_for_answers(20)
        output = ansible_playbook(
            "fleet-roll-bad",
            "rolling.yml",
            "-e",
            change,
            expect_ok=False,
            inventory=serving.inventory,
        )
    assert not load.failures, load.summary()
    assert "ROLL-OUT STOPPED on sandbox-1" in output, output[-4000:]
    assert "was rolled back to image" in output and "serves again" in output, output[-4000:]
    first = host_container(1)
    assert unit_text(first) == good_unit, "sandbox-1 runs its previous unit again"
    assert "--no-such-flag" not in unit_text(first)
    # The roll-out stopped at the first batch: the other hosts were never restarted.
    for n in (2, 3):
        assert vllm_identity(host_container(n)) == before[n], f"sandbox-{n} restarted"
    wait_for(all_in_rotation, "sandbox-1 back in rotation", 60)

"""Production runs what the sandbox proves: the pinned vLLM release with `vllm serve`, by the
digest the site's lock holds; an old release stops in preflight; a moved tag changes nothing;
a host on another digest fails verify; a restart lets a streaming request finish."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import requests
from sandbox_helpers import (
    BASE_URL,
    INVENTORY,
    ROOT,
    ansible_playbook,
    on_host,
    push_relabelled,
    push_tag,
    recap,
    started_and_healthy,
    vllm_identity,
    wait_for,
)

from servekit.images import lock as image_lock
from servekit.images import vllm_version
from servekit.sandbox.common import docker_client
from servekit.sandbox.registry import vllm_registry_repo
from servekit.sandbox.state import load_state
from servekit.verify import run_verify

pytestmark = pytest.mark.e2e

VERSION = vllm_version(ROOT)
TAG = f"servekit-control:5000/servekit/vllm-cpu:v{VERSION}"
LOCK = image_lock.lock_path(INVENTORY)
START_BUDGET_S = 300


@pytest.fixture
def serving(deployment):
    wait_for(started_and_healthy, "vLLM serving before the test", START_BUDGET_S)
    yield deployment
    wait_for(started_and_healthy, "vLLM serving after the test", START_BUDGET_S)


def container() -> dict:
    return json.loads(on_host("docker", "inspect", "vllm").stdout)[0]


def test_the_server_is_the_pinned_release_by_locked_digest_under_vllm_serve(serving):
    digest = image_lock.read_lock(LOCK)[TAG]
    inspect = container()
    assert inspect["Config"]["Image"] == f"{TAG}@{digest}"
    # The official image's entrypoint, with the model as its positional argument.
    assert [inspect["Path"], *inspect["Args"][:2]] == ["vllm", "serve", "/models/Qwen3-8B"]
    unit = on_host("systemctl", "cat", "vllm").stdout
    assert "--model" not in unit and "--shutdown-timeout 30" in unit, unit
    reported = requests.get(f"{BASE_URL}/version", timeout=10).json()["version"]
    assert reported.split("+", 1)[0] == VERSION


def test_a_release_below_the_floor_stops_in_preflight_and_changes_nothing(serving):
    before = vllm_identity()
    output = ansible_playbook(
        "deploy-vulnerable", "site.yml", "-e", "servekit_vllm_version=0.13.0", expect_ok=False
    )
    assert "CVE-2026-48746" in output
    assert "TASK [vllm_service : VLLM | Install" not in output, "it went past preflight"
    assert recap(output)["sandbox-1"]["changed"] == 0
    assert vllm_identity() == before


@pytest.fixture(scope="module")
def moved_tag(deployment):
    """The release tag pushed anew in the sandbox registry (another image: the CPU image with
    one more label); the original is pushed back afterwards. Yields the new digest."""
    state = load_state()
    assert state is not None
    moved = push_relabelled(state, f"v{VERSION}", "servekit.test.moved-tag=1")
    assert moved != image_lock.read_lock(LOCK)[TAG]
    yield moved
    client = docker_client()
    repo = vllm_registry_repo(state.registry["local"])
    client.images.get(state.images["vllm-cpu"]).tag(repo, f"v{VERSION}")
    push_tag(client, repo, f"v{VERSION}")


def images_check() -> subprocess.CompletedProcess:
    """What `make deploy` runs before the playbook."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "servekit",
            "images",
            "check",
            "--inventory",
            str(INVENTORY),
            "--registry-alias",
            "servekit-control:5000=127.0.0.1:5000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_moved_tag_is_reported_and_the_locked_digest_still_deploys(serving, moved_tag):
    locked = image_lock.read_lock(LOCK)[TAG]
    check = images_check()
    assert check.returncode == 0, check.stderr
    assert "moved" in check.stdout and "make lock-images INVENTORY=" in check.stdout, check.stdout
    assert moved_tag[:19] in check.stdout
    before = vllm_identity()
    hosts = recap(ansible_playbook("deploy-moved-tag"))
    assert hosts["sandbox-1"]["changed"] == 0, hosts
    assert vllm_identity() == before
    assert container()["Config"]["Image"] == f"{TAG}@{locked}"


def test_verify_fails_on_a_host_that_runs_another_digest_than_the_lock(
    serving, moved_tag, tmp_path
):
    # The site locked the moved tag but the host still runs the old digest.
    saved = LOCK.read_text()
    try:
        image_lock.write_lock(LOCK, {TAG: moved_tag})
        result = run_verify(INVENTORY, tmp_path)
    finally:
        LOCK.write_text(saved)
    assert not result.ok and result.host_checks_rc != 0
    junit = (tmp_path / "hosts.junit.xml").read_text()
    assert "test_container_runs_the_pinned_image" in junit
    assert moved_tag in junit


def test_a_streaming_request_finishes_across_a_restart(serving):
    """vLLM drains on SIGTERM (--shutdown-timeout): a stream that is being answered when
    `systemctl restart vllm` stops the server runs to its end; then the server comes back."""
    before = vllm_identity()
    body = {
        "model": "Qwen3-8B",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 6000,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[bytes] = []
    restart: dict = {}
    streaming = threading.Event()

    def restart_when_streaming() -> None:
        streaming.wait(60)
        restart["at"] = time.monotonic()
        restart["proc"] = on_host("systemctl", "restart", "vllm")

    thread = threading.Thread(target=restart_when_streaming)
    thread.start()
    try:
        with requests.post(
            f"{BASE_URL}/v1/chat/completions", json=body, stream=True, timeout=120
        ) as resp:
            assert resp.status_code == 200, resp.text
            for line in resp.iter_lines():
                if line.startswith(b"data: "):
                    events.append(line)
                    if len(events) == 50:
                        streaming.set()
        ended_at = time.monotonic()
    finally:
        streaming.set()
        thread.join()
    assert restart["proc"].returncode == 0, restart["proc"].stderr
    assert restart["at"] < ended_at, "the restart came after the stream: nothing was drained"
    assert events[-1] == b"data: [DONE]", f"the stream was cut after {len(events)} events"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert finish[-1] == "length", finish[-3:]
    wait_for(started_and_healthy, "vLLM back after the restart", START_BUDGET_S)
    assert vllm_identity()[1] != before[1], "the container was not restarted"


def test_the_recorded_engine_facts_are_the_pinned_release_s_own(deployment):
    """files/engines.yml (what preflight checks the reasoning parser against) says what the
    image of servekit_vllm_version registers (`make engine-facts` writes it)."""
    from servekit.sandbox.vllm_facts import load_engines, read_facts

    state = load_state()
    assert state is not None
    recorded = load_engines(ROOT)[VERSION]
    assert read_facts(state.images["vllm-cpu"]) == {
        k: v for k, v in recorded.items() if k != "source"
    }

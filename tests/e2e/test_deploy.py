"""The walking skeleton end to end: `make deploy` on the sandbox, the tutorial's requests,
`make verify`, an idempotent second deploy, a broken service caught, and destroy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from servekit.sandbox import manager
from servekit.verify import run_verify

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventory" / "sandbox" / "hosts.yml"
BASE_URL = "http://localhost:8000"
HOST_CONTAINER = "servekit-sandbox-1"


def ansible_playbook(log_name: str, playbook: str = "site.yml", *extra: str) -> str:
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
                str(INVENTORY),
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
    assert proc.returncode == 0, f"ansible-playbook failed (log {log}):\n{output[-6000:]}"
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


@pytest.fixture(scope="module")
def deployment():
    manager.up()
    output = ansible_playbook("deploy-1")
    yield output
    manager.down()


def test_first_deploy_converges(deployment):
    hosts = recap(deployment)
    assert set(hosts) == {"sandbox-1"}
    assert hosts["sandbox-1"]["failed"] == 0 and hosts["sandbox-1"]["unreachable"] == 0


def test_models_route_lists_the_served_name(deployment):
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", f"{BASE_URL}/v1/models"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ids = [m["id"] for m in json.loads(out)["data"]]
    assert ids == ["Qwen3-8B"]


def test_chat_completion_as_in_the_tutorial(deployment):
    body = {
        "model": "Qwen3-8B",
        "messages": [{"role": "user", "content": "你好，介绍一下你自己"}],  # noqa: RUF001 - the tutorial's Chinese prompt
        "max_tokens": 200,
    }
    proc = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--write-out",
            "\n%{http_code}",
            "-X",
            "POST",
            f"{BASE_URL}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body, ensure_ascii=False),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    payload, status = proc.stdout.rsplit("\n", 1)
    assert status == "200", payload
    completion = json.loads(payload)
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "Qwen3-8B"
    assert completion["choices"][0]["message"]["role"] == "assistant"


def test_python_requests_with_sampling_parameters(deployment):
    resp = requests.post(
        f"{BASE_URL}/v1/chat/completions",
        json={
            "model": "Qwen3-8B",
            "messages": [{"role": "user", "content": "Give me a short introduction to LLMs."}],
            "temperature": 0.7,
            "top_p": 0.8,
            "max_tokens": 64,
        },
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "chat.completion"
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_verify_passes_on_the_deployment(deployment, tmp_path):
    result = run_verify(INVENTORY, tmp_path)
    assert result.ok, "make verify failed on a fresh deployment (see the output above)"
    assert (tmp_path / "probes.json").exists() and (tmp_path / "probes.junit.xml").exists()


def test_second_deploy_changes_nothing_and_keeps_vllm_running(deployment):
    before = vllm_identity()
    assert all(before), f"vllm is not running before the second deploy: {before}"
    hosts = recap(ansible_playbook("deploy-2"))
    assert hosts["sandbox-1"]["changed"] == 0, f"second deploy changed things: {hosts}"
    assert vllm_identity() == before, "the second deploy restarted vLLM"


def test_gpu_plan_for_a_recorded_h100_system_changes_nothing(deployment):
    profile = ROOT / "tests" / "fixtures" / "gpu" / "h100_sxm_hgx_nvswitch.lspci"
    output = ansible_playbook(
        "gpu-plan",
        "gpu_plan.yml",
        "--check",
        "-e",
        "servekit_accelerator=gpu",
        "-e",
        f"servekit_gpu_profile={profile}",
    )
    assert "8 x H100" in output or "H100" in output
    assert "kernel modules open" in output
    assert "nvidia-fabricmanager" in output
    assert "nvidia-container-toolkit" in output
    # Check mode: nothing of the plan exists on the host afterwards.
    leftovers = on_host(
        "sh", "-c", "ls /etc/apt/sources.list.d/ /etc/modprobe.d/; dpkg -l | grep -i nvidia || true"
    ).stdout
    assert "nvidia" not in leftovers.lower(), leftovers
    assert vllm_identity()[0], "the plan must not disturb the running server"


def test_verify_fails_once_the_service_is_stopped(deployment, tmp_path):
    assert on_host("systemctl", "stop", "vllm").returncode == 0
    result = run_verify(INVENTORY, tmp_path)
    assert not result.ok
    assert result.host_checks_rc != 0
    health = [r for run in result.runs for r in run.results if r.name == "health"]
    assert health and not health[0].ok

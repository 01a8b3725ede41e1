"""The walking skeleton end to end: `make deploy` on the sandbox, the tutorial's requests,
`make verify`, an idempotent second deploy, a broken service caught, and destroy."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests
from sandbox_helpers import (
    BASE_URL,
    INVENTORY,
    ROOT,
    ansible_playbook,
    on_host,
    recap,
    vllm_identity,
)

from servekit.verify import run_verify

pytestmark = pytest.mark.e2e


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


def test_a_hand_edited_file_and_package_hold_are_put_back(deployment):
    # The converge skips files and packages it finds current; anything else must still be fixed.
    script = "/usr/local/libexec/servekit/vllm-health-check"
    rules = "/etc/prometheus/servekit-alerts.yml"
    expected = on_host("sha1sum", script, rules).stdout
    edits = (
        f"echo '# edited by hand' >> {script} && chmod 0600 {rules} && apt-mark unhold docker.io"
        " && chmod 0755 /etc/vllm"  # the API key's directory opened up
    )
    assert on_host("sh", "-c", edits).returncode == 0
    before = vllm_identity()

    output = ansible_playbook("deploy-drift")

    assert changed_tasks(output) == [
        "docker_engine : Docker engine | Hold the packages so unattended upgrades cannot"
        " restart Docker",
        "vllm_service : VLLM | Create configuration and helper directories",
        "vllm_service : VLLM | Install the readiness and health scripts",
        "monitoring : Monitoring | Install the alert rules (checked with promtool)",
        "monitoring : Reload prometheus",
    ], output
    assert on_host("sha1sum", script, rules).stdout == expected
    assert on_host("stat", "-c", "%a", script).stdout.strip() == "755"
    assert on_host("stat", "-c", "%a", rules).stdout.strip() == "644"
    assert on_host("stat", "-c", "%a", "/etc/vllm").stdout.strip() == "700"
    assert on_host("apt-mark", "showhold").stdout.split().count("docker.io") == 1
    assert vllm_identity() == before, "a changed health script must not restart vLLM"


def changed_tasks(output: str) -> list[str]:
    """The names of the tasks (and handlers) that reported a change, in order."""
    names, current = [], None
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            current = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith("changed:") and current and current not in names:
            names.append(current)
    return names


def test_gpu_plan_for_a_recorded_h100_system_changes_nothing(deployment):
    before = vllm_identity()
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
    assert "8 x H100" in output  # the plan's GPU line: all eight GPUs of the profile
    assert "kernel modules open" in output
    assert "nvidia-fabricmanager" in output
    assert "nvidia-container-toolkit" in output
    # Check mode: nothing of the plan exists on the host afterwards.
    leftovers = on_host(
        "sh", "-c", "ls /etc/apt/sources.list.d/ /etc/modprobe.d/; dpkg -l | grep -i nvidia || true"
    ).stdout
    assert "nvidia" not in leftovers.lower(), leftovers
    assert all(before), f"vllm is not running before the plan: {before}"
    assert vllm_identity() == before, "the plan must not disturb the running server"


def test_verify_fails_once_the_service_is_stopped(deployment, tmp_path):
    assert on_host("systemctl", "stop", "vllm").returncode == 0
    result = run_verify(INVENTORY, tmp_path)
    assert not result.ok
    assert result.host_checks_rc != 0
    health = [r for run in result.runs for r in run.results if r.name == "health"]
    assert health and not health[0].ok
    # Leave the deployment serving for the modules that follow.
    assert on_host("systemctl", "start", "vllm").returncode == 0

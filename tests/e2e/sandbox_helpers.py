"""Shared helpers of the sandbox end-to-end tests."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
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

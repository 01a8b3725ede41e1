"""The steps of playbooks/rolling.yml without a sandbox: the rolling_update role's record, drain,
verify, undrain and rollback entry points, run by `ansible-playbook` in the playbook's own
block/rescue with `serial: 1` and `max_fail_percentage: 0`, against the real HAProxy in front of
two fake vLLM servers on this machine (see test_gateway.py).

What cannot run here is the update itself (the model and vllm_service roles need Docker and
systemd): a stand-in task switches the model's `current` link, as the model role does, and can
fail where the server update would. So these tests prove the orchestration: a host is drained
before its update and put back only after requests verify it; a failure rolls the host back,
returns it to the gateway and stops the roll-out before the next batch; a roll-back that fails
too leaves the host out and says so. The sandbox test (tests/e2e/test_fleet_live.py) runs the real
playbook.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from gateway_helpers import (
    HELPER,
    KEY,
    LOCAL,
    ROOT,
    Gateway,
    Run,
    every_backend_ready,
    fleet_inventory,
    run_playbook,
)

ROLES = ROOT / "ansible" / "roles"

PLAYBOOK = """
- name: Rolling update, with a stand-in for the model and server update
  hosts: gpu_hosts
  gather_facts: false
  serial: 1
  max_fail_percentage: 0
  any_errors_fatal: true
  tasks:
    - name: Update the batch
      block:
        - name: Record
          ansible.builtin.include_role: {name: rolling_update, tasks_from: record}
        - name: Stand-in for the model role (switches `current` to the new version)
          ansible.builtin.file:
            src: B
            dest: "{{ model_dir }}/current"
            state: link
            force: true
        - name: Drain
          ansible.builtin.include_role: {name: rolling_update, tasks_from: drain}
        - name: Read the gateway's view while drained
          ansible.builtin.command: "{{ api }} status {{ inventory_hostname }}"
          delegate_to: gw
          register: while_drained
          changed_when: false
        - name: Stand-in for the vllm_service role
          ansible.builtin.fail:
            msg: the new server did not start
          when: inventory_hostname in fail_update
        - name: Verify
          ansible.builtin.include_role: {name: rolling_update, tasks_from: verify}
        - name: Undrain
          ansible.builtin.include_role: {name: rolling_update, tasks_from: undrain}
        - name: Say what the gateway saw while the host was updated
          ansible.builtin.debug:
            msg: "DRAINED {{ inventory_hostname }} {{ while_drained.stdout }}"
      rescue:
        - name: Roll back
          ansible.builtin.include_role: {name: rolling_update, tasks_from: rollback}
"""


@pytest.fixture
def gateway(live, backends) -> Iterator[Gateway]:
    yield from every_backend_ready(live, backends)


def roll(workdir: Path, gateway: Gateway, backends: dict, fail_update=()) -> tuple[Run, Path]:
    """Run the stand-in roll-out over b1 and b2; return the run and the model directory."""
    api = workdir / "haproxy-api"
    sock = gateway.workdir / "admin.sock"
    api.write_text(f'#!/bin/sh\nexec {sys.executable} {HELPER} --socket {sock} "$@"\n')
    api.chmod(0o755)
    model_dir = workdir / "models" / "Qwen" / "Qwen3-8B"
    for version in ("A", "B"):
        (model_dir / version).mkdir(parents=True, exist_ok=True)
    current = model_dir / "current"
    if current.is_symlink():
        current.unlink()
    current.symlink_to("A")
    unit, env = workdir / "vllm.service", workdir / "vllm.env"
    unit.write_text("[Service]\nExecStart=/usr/bin/docker run vllm\n")
    env.write_text(f"VLLM_API_KEY={KEY}\n")
    env.chmod(0o600)  # as the vllm_service role writes it
    inventory = fleet_inventory(backends)
    extra = {
        "api": str(api),
        "model_dir": str(model_dir),
        "fail_update": list(fail_update),
        "servekit_model_root": str(workdir / "models"),
        "rolling_update_state_dir": str(workdir / "rollout"),
        "rolling_update_drain_timeout": 5,
        "rolling_update_ready_timeout": 20,
        "_rolling_update_haproxy_api": str(api),
        "_rolling_update_unit_file": str(unit),
        "_rolling_update_env_file": str(env),
    }
    return run_playbook(workdir, inventory, PLAYBOOK, extra), model_dir


def drained_views(run: Run) -> dict[str, dict]:
    out = {}
    for line in run.output.splitlines():
        if '"msg": "DRAINED ' in line:
            msg = json.loads("{" + line.strip().rstrip(",") + "}")["msg"]
            _, host, view = msg.split(" ", 2)
            out[host] = json.loads(view)
    return out


def test_each_host_is_drained_updated_verified_and_put_back_in_turn(tmp_path, gateway, backends):
    run, model_dir = roll(tmp_path, gateway, backends)
    assert run.rc == 0, run.output[-4000:]
    views = drained_views(run)
    assert set(views) == {"b1", "b2"}, run.output[-3000:]
    assert all(v["drain"] for v in views.values()), views
    for name in ("b1", "b2"):
        state = gateway.server(name)
        assert state["up"] and not state["drain"], state
    assert os.readlink(model_dir / "current") == "B"
    # The key went with the verification requests, never into the output.
    assert KEY not in run.output
    assert backends["b1"].posts > 0 and backends["b2"].posts > 0


def test_a_failed_host_is_rolled_back_put_back_and_the_roll_out_stops(tmp_path, gateway, backends):
    run, model_dir = roll(tmp_path, gateway, backends, fail_update=["b1"])
    assert run.rc != 0, run.output[-4000:]
    message = run.failure("b1")
    assert message.startswith("ROLL-OUT STOPPED on b1."), message
    assert "Stand-in for the vllm_service role: the new server did not start" in message
    assert "was rolled back to image" in message and "model version A" in message
    assert "passed verification and serves again" in message
    assert os.readlink(model_dir / "current") == "A", "the previous model version is current"
    # The record holds the unit and env file only: the route gate's settings stay the
    # inventory's (applied live), which the roll-back's verification uses.
    assert sorted(p.name for p in (tmp_path / "rollout").iterdir()) == ["vllm.env", "vllm.service"]
    assert not gateway.server("b1")["drain"], "b1 serves the previous version again"
    # The next batch never started.
    assert "DRAINED b2" not in run.output and not gateway.server("b2")["drain"]
    assert "[b2]" not in run.output.split("PLAY RECAP", 1)[0]
    assert KEY not in run.output


def test_a_host_that_fails_verification_twice_stays_out_and_the_message_says_so(
    tmp_path, gateway, backends
):
    backends["b1"].mode = "error"  # chat completions answer 500, before and after
    run, _ = roll(tmp_path, gateway, backends)
    assert run.rc != 0, run.output[-4000:]
    message = run.failure("b1")
    assert "fails verification" in message and "expected HTTP 200 with a chat.completion" in message
    assert "got HTTP 500" in message
    assert "THE ROLL-BACK FAILED TOO" in message
    assert gateway.server("b1")["drain"], "a host that cannot serve stays out of the gateway"
    assert "DRAINED b2" not in run.output


def test_the_roll_out_uses_the_paths_and_names_of_the_roles_it_drives():
    rolling = yaml.safe_load((ROLES / "rolling_update" / "vars" / "main.yml").read_text())
    vllm = yaml.safe_load((ROLES / "vllm_service" / "vars" / "main.yml").read_text())
    gateway = yaml.safe_load((ROLES / "gateway" / "vars" / "main.yml").read_text())
    assert rolling["_rolling_update_container"] == vllm["_vllm_service_container"]
    assert rolling["_rolling_update_env_file"] == vllm["_vllm_service_env_file"]
    unit = (ROLES / "vllm_service" / "tasks" / "configure.yml").read_text()
    assert "/etc/systemd/system/{{ item }}" in unit and "vllm.service" in unit
    assert rolling["_rolling_update_unit_file"] == "/etc/systemd/system/vllm.service"
    assert rolling["_rolling_update_haproxy_api"] == f"{gateway['_gateway_libexec']}/haproxy-api"
    assert gateway["_gateway_backend"] == "vllm"
    assert "haproxy-api" in (ROLES / "gateway" / "files" / "haproxy-api").read_text()


PREFLIGHT = """
- name: Rolling update preflight
  hosts: gpu_hosts
  gather_facts: false
  tasks:
    - name: Check
      ansible.builtin.include_role: {name: rolling_update, tasks_from: preflight}
"""

BAD_SETTINGS = [
    ("batch-zero", {"servekit_rolling_batch": 0}, 'servekit_rolling_batch="0"', "-e servekit"),
    ("batch-words", {"servekit_rolling_batch": "half"}, "servekit_rolling_batch", '"25%"'),
    ("batch-150%", {"servekit_rolling_batch": "150%"}, "servekit_rolling_batch", '"25%"'),
    ("batch-everyone", {"servekit_rolling_batch": 3}, "updates all 3 hosts", "smaller batch"),
    ("batch-100%", {"servekit_rolling_batch": "100%"}, "updates all 3 hosts", "make deploy"),
    ("one-model-version", {"model_keep_versions": 1}, "model_keep_versions=1", "set 2 or more"),
    (
        "one-model-version-site-wide",
        {"servekit_model_keep_versions": 1},
        "servekit_model_keep_versions=1",
        "set 2 or more",
    ),
    ("ready-zero", {"rolling_update_ready_timeout": 0}, "rolling_update_ready_timeout", "at least"),
]


@pytest.mark.parametrize("case", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_roll_out_settings_are_refused(tmp_path, case):
    _, extra, names, hint = case
    hosts = {name: {} for name in ("b1", "b2", "b3")}
    inventory = {"all": {"vars": LOCAL, "children": {"gpu_hosts": {"hosts": hosts}}}}
    run = run_playbook(tmp_path, inventory, PREFLIGHT, extra)
    assert run.rc != 0, run.output[-3000:]
    message = run.failure("b1")
    assert names in message and hint in message, message


@pytest.mark.parametrize("batch", [1, 2, "50%", "10%"])
def test_good_roll_out_settings_pass(tmp_path, batch):
    hosts = {name: {} for name in ("b1", "b2", "b3")}
    inventory = {"all": {"vars": LOCAL, "children": {"gpu_hosts": {"hosts": hosts}}}}
    run = run_playbook(tmp_path, inventory, PREFLIGHT, {"servekit_rolling_batch": batch})
    assert run.rc == 0, run.output[-3000:]

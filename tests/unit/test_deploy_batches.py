"""`make deploy` on a fleet: serve.yml's first play leaves a serving vLLM running when a change
needs a restart (the vllm_service role's `Restart vllm` handler only notes it), and its second
play restarts those hosts a batch at a time: drained, restarted, verified, put back.

Run here without Docker or systemd: every host is this machine, `systemctl` is a stand-in that
records its calls and, at each restart, which servers the real HAProxy (test_gateway.py) has out
of rotation; two fake vLLM servers answer for b1 and b2. The first play's roles are replaced by
stand-ins that write a changed unit and notify the real handler; the second play is serve.yml's
own, unchanged. The sandbox test (tests/e2e/test_fleet_live.py) runs the real site.yml.
"""

from __future__ import annotations

import json
import os
import re
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

SERVE = ROOT / "ansible" / "playbooks" / "serve.yml"
OLD_UNIT = "[Service]\nExecStart=/usr/bin/docker run vllm --max-model-len 8192\n"
NEW_UNIT = "[Service]\nExecStart=/usr/bin/docker run vllm --max-model-len 4096\n"

SYSTEMCTL = """#!{python}
import json, os, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SYSTEMD"])
args = sys.argv[1:]
with open(state / "calls.log", "a") as log:
    log.write(os.environ.get("FAKE_HOST", "") + " " + " ".join(args) + "\\n")
if args[0] == "show":
    print("LoadState=loaded\\nActiveState=active\\nSubState=running")
elif args[0] == "is-active":
    active = os.environ.get("FAKE_ACTIVE", "active")
    print(active)
    sys.exit(0 if active == "active" else 3)
elif args[0] == "restart":
    api = os.environ.get("FAKE_HAPROXY_API")
    servers = json.loads(subprocess.check_output([api, "status"])) if api else []
    out = sorted(s["name"] for s in servers if s["drain"] or s["maint"] or not s["up"])
    with open(state / "restarts.log", "a") as log:
        log.write(json.dumps(out) + "\\n")
    fails = state / "fail-restarts"
    if fails.exists() and int(fails.read_text()) > 0:
        fails.write_text(str(int(fails.read_text()) - 1))
        sys.exit("Job for vllm.service failed because the control process exited with error code.")
"""


class Systemd:
    """The stand-in `systemctl` on PATH and what it saw."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "systemd"
        (self.dir / "bin").mkdir(parents=True)
        tool = self.dir / "bin" / "systemctl"
        tool.write_text(SYSTEMCTL.format(python=sys.executable))
        tool.chmod(0o755)
        self.env = {"FAKE_SYSTEMD": str(self.dir), "PATH": f"{tool.parent}:{os.environ['PATH']}"}

    def fail_restarts(self, count: int) -> None:
        (self.dir / "fail-restarts").write_text(str(count))

    def calls(self, host: str = "") -> list[str]:
        """The calls, as `<host> <arguments>` (the host where the play said which)."""
        log = self.dir / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == host]

    def restarts(self) -> list[list[str]]:
        """One entry per restart: the servers out of rotation at that moment."""
        log = self.dir / "restarts.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pending(run: Run, host: str) -> bool | None:
    """vllm_service_restart_pending (None: not set), as the play's last task printed it."""
    found = re.search(rf'"msg": "PENDING {host} (\S+)"', run.output)
    assert found, f"no PENDING line for {host}:\n{run.output[-3000:]}"
    return json.loads(found.group(1))


# ------------------------------------------------------------------ the handler

HANDLER = """
- name: A change that notifies the vllm_service role's restart
  hosts: gpu_hosts
  gather_facts: false
  # Every host is this machine: the stand-in systemctl learns from here which one asks, and
  # what its vllm.service is doing.
  environment:
    FAKE_HOST: "{{ inventory_hostname }}"
    FAKE_ACTIVE: "{{ fake_active }}"
  tasks:
    # Tagged never: the role's handlers are loaded, its tasks not run.
    - name: Load the handlers of vllm_service
      ansible.builtin.import_role: {name: vllm_service, tasks_from: restart}
      tags: [never]
    - name: Stand-in for a changed unit
      ansible.builtin.debug: {msg: the unit changed}
      changed_when: true
      notify: Restart vllm
    - name: Apply
      ansible.builtin.meta: flush_handlers
    - name: Say what is pending
      ansible.builtin.debug:
        msg: "PENDING {{ inventory_hostname }} {{ pending | to_json }}"
      vars:
        pending: "{{ vllm_service_restart_pending | default(none) }}"
"""

# host: (vllm_service_restart_mode, what `systemctl is-active vllm` says, restarted by the handler)
HANDLER_CASES = {
    "serving": ("deferred", "active", False),  # its batch restarts it
    "first-deploy": ("deferred", "inactive", True),  # not running yet: starts now
    "crashed": ("deferred", "failed", True),  # serves nobody: restarts now
    "roll": ("immediate", "active", True),  # make roll, a single host: as before
}


def test_the_handler_defers_only_the_restart_of_a_serving_server(tmp_path, backends):
    systemd = Systemd(tmp_path)
    hosts = {
        name: {
            "vllm_service_restart_mode": mode,
            "fake_active": active,
            "vllm_service_port": backends["b1"].port,
        }
        for name, (mode, active, _) in HANDLER_CASES.items()
    }
    inventory = {"all": {"vars": LOCAL, "children": {"gpu_hosts": {"hosts": hosts}}}}
    run = run_playbook(tmp_path, inventory, HANDLER, env=systemd.env)
    assert run.rc == 0, run.output[-3000:]
    for name, (_, _, restarted) in HANDLER_CASES.items():
        calls = systemd.calls(name)
        if restarted:
            # The one restart procedure: clear a start limit, reload units, restart.
            assert calls[-4:] == [
                "reset-failed vllm.service",
                "daemon-reload",
                "show vllm.service",
                "restart vllm.service",
            ], (name, calls)
        else:
            assert calls == ["is-active vllm.service"], (name, calls)
        # Noted for serve.yml's batches only where the restart was left to them.
        assert pending(run, name) is (None if restarted else True), name


# ------------------------------------------------------------------ serve.yml's batches

STAND_IN = """
- name: Stand-in for serve.yml's first play (the model and vllm_service roles need Docker)
  hosts: gpu_hosts
  gather_facts: false
  vars:
    vllm_service_restart_mode: deferred
  tasks:
    - name: Keep each host's files apart (every host is this machine)
      ansible.builtin.set_fact:
        _rolling_update_unit_file: "{{ workdir }}/{{ inventory_hostname }}/vllm.service"
        _rolling_update_env_file: "{{ workdir }}/{{ inventory_hostname }}/vllm.env"
        rolling_update_state_dir: "{{ workdir }}/{{ inventory_hostname }}/rollout"
        servekit_model_root: "{{ workdir }}/{{ inventory_hostname }}/models"
    - name: Load the handlers of vllm_service
      ansible.builtin.import_role: {name: vllm_service, tasks_from: restart}
      tags: [never]
    - name: Record, as serve.yml does first
      ansible.builtin.include_role: {name: rolling_update, tasks_from: record}
    - name: Stand-in for the model role (switches `current` to the new version)
      ansible.builtin.file:
        src: B
        dest: "{{ servekit_model_root }}/Qwen/Qwen3-8B/current"
        state: link
        force: true
      when: inventory_hostname in changed
    - name: Stand-in for the vllm_service role (writes the changed unit)
      ansible.builtin.copy:
        content: "{{ new_unit }}"
        dest: "{{ _rolling_update_unit_file }}"
        mode: "0644"
      when: inventory_hostname in changed
      notify: Restart vllm
"""


def serve_play_2() -> list[dict]:
    plays = yaml.safe_load(SERVE.read_text())
    assert len(plays) == 2, "serve.yml: the converge, then the batches"
    return [plays[1]]


@pytest.fixture
def gateway(live, backends) -> Iterator[Gateway]:
    yield from every_backend_ready(live, backends)


def deploy(
    workdir: Path, gateway: Gateway, backends: dict, changed=("b1", "b2"), fail_restarts=0, **extra
) -> tuple[Run, Systemd]:
    """The stand-in first play, then serve.yml's second, over b1 and b2 behind the gateway."""
    api = workdir / "haproxy-api"
    sock = gateway.workdir / "admin.sock"
    api.write_text(f'#!/bin/sh\nexec {sys.executable} {HELPER} --socket {sock} "$@"\n')
    api.chmod(0o755)
    for name in backends:
        host = workdir / name
        for version in ("A", "B"):
            (host / "models" / "Qwen" / "Qwen3-8B" / version).mkdir(parents=True)
        (host / "models" / "Qwen" / "Qwen3-8B" / "current").symlink_to("A")
        (host / "vllm.service").write_text(OLD_UNIT)
        (host / "vllm.env").write_text(f"VLLM_API_KEY={KEY}\n")
        (host / "vllm.env").chmod(0o600)  # as the vllm_service role writes it
    systemd = Systemd(workdir)
    systemd.fail_restarts(fail_restarts)
    inventory = fleet_inventory(backends)
    variables = {
        "workdir": str(workdir),
        "changed": list(changed),
        "new_unit": NEW_UNIT,
        "rolling_update_drain_timeout": 5,
        "rolling_update_ready_timeout": 20,
        "_rolling_update_haproxy_api": str(api),
    } | extra
    playbook = STAND_IN + yaml.safe_dump(serve_play_2(), sort_keys=False)
    env = systemd.env | {"FAKE_HAPROXY_API": str(api)}
    return run_playbook(workdir, inventory, playbook, variables, env=env), systemd


def current(workdir: Path, host: str) -> str:
    return os.readlink(workdir / host / "models" / "Qwen" / "Qwen3-8B" / "current")


def test_serving_hosts_restart_one_at_a_time_drained_and_verified(tmp_path, gateway, backends):
    posts = {name: b.posts for name, b in backends.items()}
    run, systemd = deploy(tmp_path, gateway, backends)
    assert run.rc == 0, run.output[-4000:]
    # Each restart with its own host, and only it, out of rotation; in inventory order.
    assert systemd.restarts() == [["b1"], ["b2"]], run.output[-3000:]
    assert "Restarting vLLM on b1 (1 host(s) at a time; later batches: b2)" in run.output
    assert "Restarting vLLM on b2 (1 host(s) at a time; later batches: none)" in run.output
    for name in ("b1", "b2"):
        state = gateway.server(name)
        assert state["up"] and not state["drain"], state
        # Verified with requests, sent through the gateway host's path.
        assert backends[name].posts > posts[name]
        assert (tmp_path / name / "vllm.service").read_text() == NEW_UNIT
    assert KEY not in run.output


def test_hosts_with_nothing_to_restart_skip_their_batch(tmp_path, gateway, backends):
    run, systemd = deploy(tmp_path, gateway, backends, changed=("b2",))
    assert run.rc == 0, run.output[-4000:]
    assert systemd.restarts() == [["b2"]], run.output[-3000:]
    # Nothing ran for b1 beyond the stand-in: no drain, no request, no restart.
    assert "[b1 -> gw]" not in run.output and "Restarting vLLM on b1" not in run.output
    assert (tmp_path / "b1" / "vllm.service").read_text() == OLD_UNIT


def test_a_gateway_the_run_has_not_set_up_yet_drains_nothing(tmp_path, gateway, backends):
    """A gateway added to the inventory in this run: the gateway play sets it up only at the
    end, so it routes nothing yet and the hosts restart in turn without a drain."""
    absent = tmp_path / "not-installed" / "haproxy-api"
    run, systemd = deploy(tmp_path, gateway, backends, _rolling_update_haproxy_api=str(absent))
    assert run.rc == 0, run.output[-4000:]
    assert systemd.restarts() == [[], []], run.output[-3000:]
    assert "Restarting vLLM on b2 (1 host(s) at a time; later batches: none)" in run.output


def test_the_batch_size_comes_from_servekit_max_unavailable(tmp_path, gateway, backends):
    run, systemd = deploy(tmp_path, gateway, backends, servekit_max_unavailable=2)
    assert run.rc == 0, run.output[-4000:]
    # One batch of both hosts: both out of rotation while they restart.
    assert systemd.restarts() == [["b1", "b2"], ["b1", "b2"]], run.output[-3000:]
    assert "Restarting vLLM on b1, b2 (2 host(s) at a time" in run.output


def test_a_failed_restart_rolls_the_host_back_and_the_later_hosts_keep_theirs(
    tmp_path, gateway, backends
):
    run, systemd = deploy(tmp_path, gateway, backends, fail_restarts=1)
    assert run.rc != 0, run.output[-4000:]
    message = run.failure("b1")
    assert message.startswith("ROLL-OUT STOPPED on b1."), message
    assert "failed in VLLM | Restart the server: Unable to restart service vllm.service" in message
    assert "b1 was rolled back to image" in message and "serves again" in message
    assert "Not restarted, still serving the previous version: b2;" in message
    assert "are back as they were" in message, message
    # b1: the failed restart, then the restart onto its previous unit; b2 never restarted.
    assert systemd.restarts() == [["b1"], ["b1"]], run.output[-3000:]
    assert "[b2 -> gw]" not in run.output, "b2 was never drained"
    assert "[b2]" not in run.output.split("PLAY [Serve | Restart", 1)[1].split("PLAY RECAP")[0]
    for name in ("b1", "b2"):
        assert (tmp_path / name / "vllm.service").read_text() == OLD_UNIT, name
        assert current(tmp_path, name) == "A", name
        assert not gateway.server(name)["drain"], name
    # systemd on b2 read its unit again: a crash there brings back what it served.
    assert systemd.calls().count("daemon-reload") == 3
    assert KEY not in run.output


def test_the_batches_stop_at_the_first_failure():
    """What the runs above rely on, where a run with more hosts would show it."""
    play = serve_play_2()[0]
    assert play["serial"] == "{{ servekit_max_unavailable | default(1) }}"
    assert play["max_fail_percentage"] == 0 and play["any_errors_fatal"] is True
    batch = play["tasks"][-1]
    steps = [t["ansible.builtin.include_role"] for t in batch["block"]]
    assert [(s["name"], s["tasks_from"]) for s in steps] == [
        ("rolling_update", "drain"),
        ("vllm_service", "restart"),
        ("rolling_update", "verify"),
        ("rolling_update", "undrain"),
    ]
    assert [t["ansible.builtin.include_role"]["tasks_from"] for t in batch["rescue"]] == [
        "rollback"
    ]

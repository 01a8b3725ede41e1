"""Shared by the gateway and rolling update unit tests: the gateway role rendered by
`ansible-playbook` on a local connection into a temporary directory (paths the role keeps under
/etc, /run and /var/lib moved there), and HAProxy run on that configuration in the foreground."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from ansible_local import local_ansible_env
from fake_backend import MODEL

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
ROLE = ANSIBLE / "roles" / "gateway"
HELPER = ROLE / "files" / "haproxy-api"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
HAPROXY = shutil.which("haproxy")

KEY = "sk-gateway-test-5e1f0c2d9a7b4e6f8a1c3e5d7b9f"
FATAL = re.compile(r"^fatal: \[(?P<host>[^\]]+)\]: FAILED! => (?P<json>\{.*\})$", re.M)

RENDER = """
- name: Render the gateway configuration
  hosts: gateway
  gather_facts: true
  tasks:
    - name: Gateway preflight (its variables stay visible below)
      ansible.builtin.include_role: {name: gateway, tasks_from: preflight, public: true}
    - name: Key file
      ansible.builtin.template:
        src: "{{ role_dir }}/templates/servekit-api-keys.lst.j2"
        dest: "{{ _gateway_api_keys_file }}"
        mode: "0600"
    - name: TLS certificate and key
      ansible.builtin.copy:
        content: "{{ gateway_tls_certificate }}"
        dest: "{{ _gateway_tls_file }}"
        mode: "0600"
      when: gateway_tls_certificate | length > 0
    - name: Configuration, checked as the role checks it
      ansible.builtin.template:
        src: "{{ role_dir }}/templates/haproxy.cfg.j2"
        dest: "{{ out }}/haproxy.cfg"
        mode: "0644"
        validate: "{{ validate }}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    rc: int
    output: str

    def failure(self, host: str = "gw") -> str:
        """The message of the last task that failed on ``host`` (what stopped it)."""
        found = [m for m in FATAL.finditer(self.output) if m.group("host") == host]
        assert found, f"no failure for {host}:\n{self.output[-3000:]}"
        return str(json.loads(found[-1].group("json")).get("msg"))


def run_playbook(
    workdir: Path,
    inventory: dict,
    playbook: str,
    extra: dict | None = None,
    env: dict | None = None,
) -> Run:
    """``env``: more environment for ansible-playbook and the modules it runs here."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "hosts.yml").write_text(json.dumps(inventory, indent=2))
    (workdir / "play.yml").write_text(playbook)
    (workdir / "extra.json").write_text(json.dumps(extra or {}))
    roles = str(ANSIBLE / "roles")
    environment = local_ansible_env(workdir, ANSIBLE_ROLES_PATH=roles) | (env or {})
    cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(workdir / "hosts.yml"), str(workdir / "play.yml")]
    proc = subprocess.run(
        [*cmd, "-e", f"@{workdir / 'extra.json'}"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return Run(proc.returncode, proc.stdout + proc.stderr)


LOCAL = {
    "ansible_connection": "local",
    "ansible_python_interpreter": sys.executable,
    "ansible_become": False,
    "ansible_host": "127.0.0.1",
}


def inventory(ports: tuple[int, int], gateway: dict, backends: dict | None = None) -> dict:
    """Two backends b1, b2 on this machine and the gateway gw, all reached locally."""
    hosts = {
        name: {"vllm_service_port": port, "vllm_service_bind_address": "0.0.0.0"}
        for name, port in zip(("b1", "b2"), ports, strict=True)
    }
    for name, extra in (backends or {}).items():
        hosts[name] |= extra
    return {
        "all": {
            "vars": LOCAL,
            "children": {
                "gpu_hosts": {"hosts": hosts},
                "gateway": {"hosts": {"gw": gateway}},
            },
        }
    }


def fleet_inventory(backends: dict) -> dict:
    """GPU hosts (this machine, one per fake backend) behind the local gateway host `gw`,
    all with the test key: the inventory of the roll-out and deploy-batch tests."""
    hosts = {
        name: {"vllm_service_port": b.port, "vllm_service_bind_address": "0.0.0.0"}
        for name, b in backends.items()
    }
    return {
        "all": {
            "vars": LOCAL | {"vllm_service_api_key": KEY},
            "children": {"gpu_hosts": {"hosts": hosts}, "gateway": {"hosts": {"gw": {}}}},
        }
    }


def every_backend_ready(live: Gateway, backends: dict):
    """The live gateway with every fake backend answering and in rotation; the backends
    answer normally again afterwards (the body of a fixture)."""
    for name, backend in backends.items():
        backend.mode = "ok"
        live.api("ready", name)
        live.wait_until(lambda n=name: live.server(n)["up"], f"{name} up")
    yield live
    for backend in backends.values():
        backend.mode = "ok"


def internal_paths(workdir: Path) -> dict:
    """Where the rendered gateway keeps what the role puts under /etc, /run and /var/lib."""
    return {
        "role_dir": str(ROLE),
        "out": str(workdir),
        "_gateway_api_keys_file": str(workdir / "keys.lst"),
        "_gateway_tls_file": str(workdir / "tls.pem"),
        "_gateway_state_file": str(workdir / "server-state"),
        "_gateway_stats_socket": str(workdir / "admin.sock"),
        "_gateway_chroot": "",
        "_gateway_user": "",
        "validate": "haproxy -c -f %s" if HAPROXY else "true %s",
    }


def render(workdir: Path, ports=(18001, 18002), backends=None, **gateway) -> Run:
    gw = {"gateway_port": 18000, "gateway_stats_port": 18099, "gateway_bind_address": "127.0.0.1"}
    gw |= gateway
    return run_playbook(workdir, inventory(ports, gw, backends), RENDER, internal_paths(workdir))


class Gateway:
    """HAProxy (master-worker, foreground) on the rendered configuration."""

    def __init__(self, workdir: Path, port: int, stats_port: int) -> None:
        self.workdir, self.port, self.stats_port = workdir, port, stats_port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Gateway:
        self.log = open(self.workdir / "haproxy.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [HAPROXY, "-W", "-db", "-f", str(self.workdir / "haproxy.cfg")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_until(lambda: self.healthz() == 200, "the gateway to see a backend")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()

    def api(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        sock = str(self.workdir / "admin.sock")
        proc = subprocess.run(
            [sys.executable, str(HELPER), "--socket", sock, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def server(self, name: str) -> dict:
        return json.loads(self.api("status", name).stdout)

    def reload(self) -> None:
        """What the role's systemd drop-in does on `systemctl reload haproxy`."""
        self.api("save-state", str(self.workdir / "server-state"))
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR2)
        time.sleep(1.0)
        self.wait_until(lambda: self.healthz() == 200, "the gateway after the reload")

    def healthz(self) -> int:
        try:
            return requests.get(
                f"http://127.0.0.1:{self.stats_port}/healthz", timeout=2
            ).status_code
        except requests.RequestException:
            return -1

    def chat(self, key: str | None = KEY, **body) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | body
        return requests.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=60
        )

    @staticmethod
    def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)


def start_live_gateway(workdir: Path, backends: dict, **gateway) -> Gateway:
    """HAProxy on the rendered configuration in front of ``backends`` (b1, b2), with the
    edge key, fast checks and short connect timeouts."""
    port, stats = free_port(), free_port()
    settings = {
        "gateway_port": port,
        "gateway_stats_port": stats,
        "gateway_api_key": KEY,
        "gateway_check_interval": "300ms",
        "gateway_timeout_connect": "1s",
    } | gateway
    run = render(workdir, ports=(backends["b1"].port, backends["b2"].port), **settings)
    assert run.rc == 0, run.output[-3000:]
    return Gateway(workdir, port, stats).start()

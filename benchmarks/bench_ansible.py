"""Running ``site.yml`` for the benchmark and reading its output.

Per-task times come from the ``profile_tasks`` callback that ``ansible/ansible.cfg`` enables:
under every task header it prints a line such as::

    TASK [vllm_service : VLLM | Pull the pinned image] *****************************
    Wednesday 25 November 2026  04:04:18 +0000 (0:00:00.254)       0:00:59.810 ****

where the second time is the playbook's elapsed time when the task started. A task lasts until
the next header's elapsed time; the last one until the ``TASKS RECAP`` line's.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_CFG = ROOT / "ansible" / "ansible.cfg"
SITE = "ansible/playbooks/site.yml"
SANDBOX_INVENTORY = ROOT / "inventory" / "sandbox" / "hosts.yml"

#: The converge phases, in playbook order.
PHASES = ("preflight", "docker_engine", "image", "model", "service_start")
HOST_STACK_ROLES = ("nvidia_driver", "docker_engine", "nvidia_container_toolkit")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HEADER = re.compile(r"^(?P<kind>TASK|RUNNING HANDLER) \[(?P<name>.*)\] \**\s*$")
_PLAY = re.compile(r"^PLAY \[(?P<name>.*)\] \**\s*$")
_TASKS_RECAP = re.compile(r"^TASKS RECAP \**\s*$")
_STAMP = re.compile(
    r"\((?P<dh>\d+):(?P<dm>\d{2}):(?P<ds>\d{2}(?:\.\d+)?)\)\s+"
    r"(?P<h>\d+):(?P<m>\d{2}):(?P<s>\d{2}(?:\.\d+)?)\s+\*+\s*$"
)
_RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>ok=\d+.*)$")


@dataclass
class Task:
    play: str
    name: str
    handler: bool
    start_s: float  # playbook elapsed time when the task started
    seconds: float | None = None  # None: the output ends before the task did

    @property
    def role(self) -> str:
        return self.name.split(" : ", 1)[0].strip() if " : " in self.name else ""


@dataclass
class Profile:
    tasks: list[Task] = field(default_factory=list)
    total_s: float | None = None  # the TASKS RECAP line's elapsed time


def parse_profile(output: str) -> Profile:
    """The tasks of a playbook run, with their durations, from ``profile_tasks`` output."""
    profile = Profile()
    play = ""
    pending: tuple[str, bool] | None = None  # header waiting for its time line
    in_recap = False
    for raw in output.splitlines():
        line = _ANSI.sub("", raw).rstrip("\n")
        if m := _PLAY.match(line):
            play, pending = m.group("name"), None
            continue
        if m := _HEADER.match(line):
            pending, in_recap = (m.group("name"), m.group("kind") != "TASK"), False
            continue
        if _TASKS_RECAP.match(line):
            pending, in_recap = None, True
            continue
        m = _STAMP.search(line)
        if not m:
            continue
        elapsed = int(m.group("h")) * 3600 + int(m.group("m")) * 60 + float(m.group("s"))
        if in_recap:
            profile.total_s = elapsed
            in_recap = False
        elif pending is not None:
            profile.tasks.append(Task(play, pending[0], pending[1], elapsed))
            pending = None
    ends = [t.start_s for t in profile.tasks[1:]] + [profile.total_s]
    for task, end in zip(profile.tasks, ends, strict=True):
        task.seconds = None if end is None else round(max(0.0, end - task.start_s), 3)
    return profile


def phase_of(play: str, task: str) -> str:
    """Which converge phase a task belongs to.

    - everything in the preflight play (including each role's input checks) is ``preflight``;
    - the host stack roles (NVIDIA driver, Docker, NVIDIA Container Toolkit) are
      ``docker_engine`` (the NVIDIA roles end at once on a CPU host);
    - ``model`` is the model role;
    - the vLLM role's image check and pull are ``image``; the rest of it (its files, units,
      the restart handler that waits for /health, enabling the units) is ``service_start``, and
      so is serve.yml's play of batches (the restarts a fleet's deploy defers to it);
    - a task outside any role (fact gathering) counts for its play's first phase.
    """
    p = play.strip().lower()
    if p.startswith("preflight"):
        return "preflight"
    role = task.split(" : ", 1)[0].strip() if " : " in task else ""
    if role in HOST_STACK_ROLES:
        return "docker_engine"
    if role == "model":
        return "model"
    if role == "vllm_service":
        return "image" if "pinned image" in task.lower() else "service_start"
    if role == "preflight":
        return "preflight"
    if p.startswith("host stack"):
        return "docker_engine"
    if p.startswith("serve | restart"):  # serve.yml's batches: the restarts it deferred
        return "service_start"
    if p.startswith("serve"):
        return "model"
    return "other"


def phase_seconds(profile: Profile) -> dict[str, float]:
    """Seconds per phase (only phases that had tasks), in playbook order."""
    out: dict[str, float] = {}
    for task in profile.tasks:
        phase = phase_of(task.play, task.name)
        out[phase] = round(out.get(phase, 0.0) + (task.seconds or 0.0), 3)
    order = [*PHASES, "other"]
    return {k: out[k] for k in order if k in out}


def role_seconds(profile: Profile) -> dict[str, float]:
    """Seconds per role (tasks outside a role under their play's name), in playbook order."""
    out: dict[str, float] = {}
    for task in profile.tasks:
        key = task.role or f"play: {task.play}"
        out[key] = round(out.get(key, 0.0) + (task.seconds or 0.0), 3)
    return out


def slowest(profile: Profile, count: int = 5) -> list[dict[str, Any]]:
    tasks = sorted(profile.tasks, key=lambda t: t.seconds or 0.0, reverse=True)[:count]
    return [{"task": t.name, "seconds": t.seconds} for t in tasks]


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """``{host: {"ok": .., "changed": .., ...}}`` from the PLAY RECAP; {} without one."""
    _, found, after = _ANSI.sub("", output).rpartition("PLAY RECAP")
    if not found:
        return {}
    hosts: dict[str, dict[str, int]] = {}
    for line in after.splitlines()[1:]:
        line = line.strip()
        if not line:
            if hosts:
                break
            continue
        m = _RECAP_LINE.match(line)
        if not m:
            break
        counts = re.findall(r"(\w+)=(\d+)", m.group("counts"))
        hosts[m.group("host")] = {k: int(v) for k, v in counts}
    return hosts


# --- running ---------------------------------------------------------------------------------


@dataclass
class PlaybookRun:
    rc: int
    seconds: float
    output: str
    log: Path

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        return parse_recap(self.output)

    @property
    def profile(self) -> Profile:
        return parse_profile(self.output)

    def changed(self) -> int:
        return sum(h.get("changed", 0) for h in self.recap.values())

    def check(self) -> PlaybookRun:
        if self.rc != 0:
            tail = "\n".join(self.output.splitlines()[-25:])
            raise RuntimeError(f"ansible-playbook failed (exit {self.rc}; log {self.log}):\n{tail}")
        return self


def read_cfg(path: Path = ANSIBLE_CFG) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    cfg.read(path)
    return cfg


def ansible_settings(path: Path = ANSIBLE_CFG) -> dict[str, str | None]:
    """The ansible.cfg settings that decide how fast a converge is."""
    cfg = read_cfg(path)

    def get(section: str, key: str) -> str | None:
        return cfg.get(section, key, fallback=None)

    return {
        "pipelining": get("ssh_connection", "pipelining"),
        "ssh_args": get("ssh_connection", "ssh_args"),
        "gathering": get("defaults", "gathering"),
        "fact_caching": get("defaults", "fact_caching"),
        "fact_caching_timeout": get("defaults", "fact_caching_timeout"),
        "forks": get("defaults", "forks"),
        "strategy": get("defaults", "strategy") or "linear",
        "callbacks_enabled": get("defaults", "callbacks_enabled"),
    }


def callbacks_with_profile(enabled: str | None) -> str:
    """ansible.cfg's callbacks plus ``profile_tasks`` (the benchmark needs its timings)."""
    names = [n.strip() for n in (enabled or "").split(",") if n.strip()]
    if not any(n.split(".")[-1] == "profile_tasks" for n in names):
        names.append("profile_tasks")
    return ",".join(names)


def fact_cache_dir(path: Path = ANSIBLE_CFG) -> Path:
    """The jsonfile fact cache (a relative path in ansible.cfg is relative to the file)."""
    conn = read_cfg(path).get("defaults", "fact_caching_connection", fallback=".facts")
    p = Path(os.path.expanduser(conn))
    return p if p.is_absolute() else path.parent / p


def forget_facts(hosts: Iterable[str], path: Path = ANSIBLE_CFG) -> list[Path]:
    """Drop cached facts of hosts that were just recreated, as a first converge has none.

    The jsonfile cache names a host's file ``[fact_caching_prefix]<key>``, where ansible-core
    2.19 makes the key ``s<schema>_<host>`` (earlier releases: the host name alone)."""
    cache = fact_cache_dir(path)
    prefix = read_cfg(path).get("defaults", "fact_caching_prefix", fallback="") or ""
    names = [re.compile(rf"{re.escape(prefix)}(?:s\d+_)?{re.escape(host)}") for host in hosts]
    removed = []
    if cache.is_dir():
        for entry in cache.iterdir():
            if any(n.fullmatch(entry.name) for n in names):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def playbook_env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["ANSIBLE_CONFIG"] = str(ANSIBLE_CFG)
    env["ANSIBLE_NOCOLOR"] = "1"
    env.pop("ANSIBLE_FORCE_COLOR", None)
    env["ANSIBLE_CALLBACKS_ENABLED"] = callbacks_with_profile(
        ansible_settings()["callbacks_enabled"]
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_playbook(
    log: Path,
    inventory: Path = SANDBOX_INVENTORY,
    playbook: str = SITE,
    extra: Sequence[str] = (),
) -> PlaybookRun:
    """``ansible-playbook -i INVENTORY PLAYBOOK`` as `make deploy` runs it; wall time of the
    whole process (start-up included). Output goes to ``log``."""
    bindir = Path(sys.executable).parent
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(bindir / "ansible-playbook"), "-i", str(inventory), playbook, *extra]
    with log.open("w") as fh:
        start = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=playbook_env(), stdout=fh, stderr=subprocess.STDOUT, check=False
        )
        seconds = time.monotonic() - start
    return PlaybookRun(proc.returncode, round(seconds, 3), log.read_text(errors="replace"), log)


# --- inventories and role settings -----------------------------------------------------------


def sandbox_inventory(hosts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An inventory of sandbox hosts (``SandboxHost`` dicts: hostname, ssh_host, ssh_port,
    api_port), shaped like ``inventory/sandbox/hosts.yml``."""
    entries = {
        h["hostname"]: {
            "ansible_host": h["ssh_host"],
            "ansible_port": h["ssh_port"],
            "servekit_probe_url": f"http://127.0.0.1:{h['api_port']}",
        }
        for h in hosts
    }
    return {"all": {"children": {"gpu_hosts": {"hosts": entries}}}}


def write_inventory(directory: Path, hosts: Sequence[Mapping[str, Any]]) -> Path:
    """``directory/hosts.yml`` for ``hosts`` with a copy of the sandbox's group_vars beside it
    (Ansible reads group_vars next to the inventory file)."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    group_vars = directory / "group_vars"
    if group_vars.exists():
        shutil.rmtree(group_vars)
    shutil.copytree(SANDBOX_INVENTORY.parent / "group_vars", group_vars)
    path = directory / "hosts.yml"
    path.write_text("---\n" + yaml.safe_dump(sandbox_inventory(hosts), sort_keys=False))
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) or {}


def sandbox_group_vars() -> dict[str, Any]:
    return load_yaml(SANDBOX_INVENTORY.parent / "group_vars" / "gpu_hosts.yml")


def role_setting(role: str, name: str, where: str = "defaults/main.yml") -> Any:
    return load_yaml(ROOT / "ansible" / "roles" / role / where).get(name)

"""The API firewall (vllm_service_firewall_allowed_cidrs), run for real in network namespaces.

The role's `vllm-firewall` script is rendered with Ansible's own templating from the role's
defaults and vars, then run as root inside private network namespaces (`unshare --net`)
with whichever iptables backends this machine has (nft, legacy), in a namespace prepared
the way Docker prepares a host: a DOCKER-USER chain that FORWARD jumps to first. The rules
are read back with `iptables -S`; then real connections go through a Docker-like DNAT
(client namespace -> host namespace -> container namespace) from an allowed and a
disallowed source address. The allow-list filter and the unit are checked without root.

The monitoring role's `exporters-firewall` (exporters on a monitoring address beyond loopback)
is run the same way: node_exporter, a host process, is filtered in INPUT, the DCGM exporter's
Docker-published port in DOCKER-USER, and real connections to both come from an allowed and a
disallowed address, and from the host itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import servekit_net  # ansible/plugins/filter, on pytest's pythonpath (pyproject.toml)
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import filter_loader, init_plugin_loader
from ansible.template import Templar, trust_as_template
from test_bad_inputs import Case, _check_stayed_in_preflight, _run_batch, this_host_ipv4

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "vllm_service"


LOADER = DataLoader()
# The role's templates use the file lookup (the image lock, the engine facts) and the kit's
# own filters, as the template module finds them through ansible.cfg.
init_plugin_loader()
filter_loader.add_directory(str(ROOT / "ansible" / "plugins" / "filter"))
CHAIN = "SERVEKIT-VLLM"
# What Docker puts in the filter table before any user rule (libnetwork's setupUserChain).
DOCKER_USER = ["-N DOCKER-USER", "-A FORWARD -j DOCKER-USER", "-A DOCKER-USER -j RETURN"]


def render(template: str, role: Path = ROLE, **variables) -> str:
    """A template of the role, rendered the way the template module renders it."""
    values: dict = {}
    for path in (role / "defaults" / "main.yml", role / "vars" / "main.yml"):
        values.update(LOADER.load_from_file(str(path), trusted_as_template=True) or {})
    values.update(
        ansible_facts={"os_family": "Debian"},
        ansible_managed="Ansible managed",
        inventory_hostname="gpu-1",
    )
    values.update(variables)
    templar = Templar(loader=LOADER, variables=values)
    source = (role / "templates" / template).read_text()
    overrides = {"trim_blocks": True, "lstrip_blocks": False, "newline_sequence": "\n"}
    return templar.template(
        trust_as_template(source), escape_backslashes=False, overrides=overrides
    )


def write_script(path: Path, **variables) -> Path:
    """The role's script for a host that publishes the API on every address (unless
    ``variables`` say otherwise), written to ``path``."""
    variables.setdefault("vllm_service_bind_address", "0.0.0.0")
    path.write_text(render("vllm-firewall.j2", **variables))
    path.chmod(0o755)
    return path


def match(port: int, dest: str = "") -> str:
    """The conntrack match of the rules as `iptables -S` prints it."""
    dest = f" --ctorigdst {dest}" if dest else ""
    return f"-p tcp -m conntrack --ctstate DNAT{dest} --ctorigdstport {port} --ctdir ORIGINAL"


# --- the allow-list: filter, argument spec, preflight ----------------------------------------


@pytest.mark.parametrize(
    "good", [[], ["10.0.0.0/8"], ["192.0.2.10", "192.0.2.0/24", "0.0.0.0/0", "10.0.0.0/255.0.0.0"]]
)
def test_ipv4_networks_are_accepted(good):
    assert servekit_net.ipv4_network_problems(good) == []


BAD_ENTRIES = [
    ("10.0.0.0/33", '"10.0.0.0/33" has a prefix length above 32'),
    ("not-a-cidr", '"not-a-cidr" is not an IP address or network'),
    ("10.0.0.0/x", '"10.0.0.0/x" is not an IP address or network'),
    ("300.1.2.3", '"300.1.2.3" is not an IP address or network'),
    ("", '"" is not an IP address or network'),
    (" 10.0.0.0/8", '" 10.0.0.0/8" is not an IP address or network'),
    ("gpu-1.lan", '"gpu-1.lan" is not an IP address or network'),
    ("10.0.0.1/8", '"10.0.0.1/8" has host bits set (the network is 10.0.0.0/8)'),
    ("2001:db8::/32", '"2001:db8::/32" is IPv6 (the firewall filters IPv4 only)'),
    (10, "10 is not text"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_ENTRIES, ids=[repr(bad) for bad, _ in BAD_ENTRIES])
def test_other_entries_are_named_with_the_problem(bad, problem):
    assert servekit_net.ipv4_network_problems(["10.0.0.0/8", bad]) == [problem]


def test_a_value_that_is_not_a_list_is_left_to_the_type_check():
    # The preflight's own check says "not a list"; the filter must not walk the string.
    assert servekit_net.ipv4_network_problems("10.0.0.0/8") == []


def test_argument_spec_lists_the_allow_list_like_the_defaults():
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    option = spec["argument_specs"]["main"]["options"]["vllm_service_firewall_allowed_cidrs"]
    assert option["type"] == "list" and option["elements"] == "str"
    assert option["default"] == defaults["vllm_service_firewall_allowed_cidrs"] == []
    validator = ArgumentSpecValidator({"vllm_service_firewall_allowed_cidrs": option})
    bad = validator.validate({"vllm_service_firewall_allowed_cidrs": {"10.0.0.0/8": True}})
    assert bad.error_messages


ALLOW_LISTS = {
    "any-address": {"vllm_service_firewall_allowed_cidrs": ["10.0.0.0/8", "192.0.2.10"]},
    "one-address": {
        "vllm_service_firewall_allowed_cidrs": ["192.0.2.0/24"],
        "vllm_service_bind_address": this_host_ipv4(),
    },
}


@pytest.fixture(scope="module")
def allow_list_runs(tmp_path_factory) -> dict:
    """The preflight playbook, once, with a host for each allow-list."""
    cases = [Case(name, overrides, hint="") for name, overrides in ALLOW_LISTS.items()]
    return _run_batch(cases, tmp_path_factory.mktemp("allow-lists"))


@pytest.mark.parametrize("name", ALLOW_LISTS)
def test_preflight_accepts_an_allow_list(allow_list_runs, name):
    run = allow_list_runs[name]
    assert run.rc == 0 and run.failed_task is None, run.output
    _check_stayed_in_preflight(run)


# --- the unit ------------------------------------------------------------------------------


def test_unit_applies_after_docker_and_before_vllm():
    unit = render("vllm-firewall.service.j2", vllm_service_firewall_allowed_cidrs=["10.0.0.0/8"])
    lines = set(unit.splitlines())
    script = "/usr/local/libexec/servekit/vllm-firewall"
    assert {
        "After=docker.service",
        "PartOf=docker.service",
        "Before=vllm.service",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"ExecStart={script} apply",
        f"ExecReload={script} apply",
        "WantedBy=docker.service vllm.service",
    } <= lines, unit


# --- the script, run as root in network namespaces -------------------------------------------


def _netns_missing() -> str | None:
    """What this machine lacks to run the script in network namespaces, or None."""
    if os.geteuid() != 0:
        return "needs root (iptables in a private network namespace)"
    missing = [t for t in ("unshare", "nsenter", "ip", "iptables") if shutil.which(t) is None]
    return f"needs {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def netns_tools() -> None:
    """Outside CI, the namespace tests are skipped (with the reason) where they cannot run.
    CI (the `CI` environment variable, which .ci/run sets) runs them as root with unshare,
    nsenter, ip and iptables installed: there a missing one fails them instead of hiding them."""
    missing = _netns_missing()
    if missing and os.environ.get("CI"):
        pytest.fail(
            f"the firewall's namespace tests cannot run in CI: {missing}. CI runs them as root "
            "with util-linux (unshare, nsenter), iproute2 (ip) and iptables installed"
        )
    if missing:
        pytest.skip(f"{missing} (outside CI; with CI set this fails)")


needs_netns = pytest.mark.usefixtures("netns_tools")


def _backends() -> list[str]:
    """The iptables backends this machine has: nft, legacy, or both."""
    return [
        name
        for name in ("nft", "legacy")
        if shutil.which(f"iptables-{name}") and shutil.which(f"iptables-{name}-restore")
    ] or ["default"]


class Netns:
    """A network namespace held open by a `sleep` process; commands enter it with nsenter.

    ``path`` goes first in PATH, so ``iptables`` there means the chosen backend.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.proc.pid}/ns/net") == mine:
            assert time.monotonic() < deadline, "unshare --net did not make a namespace"
            time.sleep(0.01)
        self.pid = self.proc.pid
        self.run("ip", "link", "set", "lo", "up")

    def command(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv]

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, PATH=self.path + os.pathsep + os.environ.get("PATH", ""))

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.command(*argv), env=self.env, capture_output=True, text=True, timeout=60
        )
        if check:
            assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}{result.stderr}"
        return result

    def start(self, *argv: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*argv), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def rules(self) -> list[str]:
        """`iptables -S` of the filter table, without the built-in chains' policies."""
        out = self.run("iptables", "-w", "-S").stdout.splitlines()
        return [line for line in out if not line.startswith("-P ")]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(params=_backends())
def backend_path(request, tmp_path) -> str:
    """A directory whose `iptables` and `iptables-restore` are the chosen backend."""
    if request.param == "default":
        return str(tmp_path)
    bindir = tmp_path / f"iptables-{request.param}"
    bindir.mkdir()
    for tool in ("iptables", "iptables-restore"):
        real = shutil.which(tool.replace("iptables", f"iptables-{request.param}", 1))
        (bindir / tool).symlink_to(real)
    return str(bindir)


@pytest.fixture
def namespaces(backend_path) -> Iterator[list[Netns]]:
    """Makes namespaces on demand (``namespaces.append(Netns(backend_path))``); closes them."""
    made: list[Netns] = []
    yield made
    for ns in made:
        ns.close()


@pytest.fixture
def docker_host(namespaces, backend_path) -> Netns:
    """A namespace with the filter chains Docker makes when it starts."""
    host = Netns(backend_path)
    namespaces.append(host)
    host.run("iptables", "-w", "-N", "DOCKER-USER")
    host.run("iptables", "-w", "-A", "DOCKER-USER", "-j", "RETURN")
    host.run("iptables", "-w", "-A", "FORWARD", "-j", "DOCKER-USER")
    assert host.rules() == DOCKER_USER
    return host


@needs_netns
def test_apply_installs_exactly_the_allow_list_and_is_idempotent(docker_host, tmp_path):
    script = write_script(
        tmp_path / "vllm-firewall",
        vllm_service_port=18000,
        vllm_service_firewall_allowed_cidrs=["10.1.0.2", "192.168.0.0/16"],
    )
    expected = [
        "-N DOCKER-USER",
        f"-N {CHAIN}",
        "-A FORWARD -j DOCKER-USER",
        f"-A DOCKER-USER -j {CHAIN}",
        "-A DOCKER-USER -j RETURN",
        f"-A {CHAIN} -s 10.1.0.2/32 {match(18000)} -j RETURN",
        f"-A {CHAIN} -s 192.168.0.0/16 {match(18000)} -j RETURN",
        f"-A {CHAIN} {match(18000)} -j REJECT --reject-with tcp-reset",
    ]
    first = docker_host.run(str(script), "apply")
    assert "allowed from 10.1.0.2, 192.168.0.0/16 only" in first.stdout
    assert docker_host.rules() == expected
    # Every run of the unit (boot, Docker restart, reload) applies again: one jump, same rules.
    docker_host.run(str(script), "apply")
    docker_host.run(str(script), "apply")
    assert docker_host.rules() == expected


@needs_netns
def test_a_changed_list_replaces_the_rules(docker_host, tmp_path):
    script = tmp_path / "vllm-firewall"
    write_script(script, vllm_service_firewall_allowed_cidrs=["10.0.0.0/8", "172.16.0.0/12"])
    docker_host.run(str(script), "apply")
    write_script(
        script,
        vllm_service_bind_address="10.1.0.1",
        vllm_service_firewall_allowed_cidrs=["192.0.2.7"],
    )
    docker_host.run(str(script), "apply")
    assert docker_host.rules() == [
        "-N DOCKER-USER",
        f"-N {CHAIN}",
        "-A FORWARD -j DOCKER-USER",
        f"-A DOCKER-USER -j {CHAIN}",
        "-A DOCKER-USER -j RETURN",
        # A publish on one address: only connections to that address are filtered.
        f"-A {CHAIN} -s 192.0.2.7/32 {match(8000, '10.1.0.1')} -j RETURN",
        f"-A {CHAIN} {match(8000, '10.1.0.1')} -j REJECT --reject-with tcp-reset",
    ]


@needs_netns
def test_apply_keeps_rules_users_put_in_docker_user(docker_host, tmp_path):
    docker_host.run("iptables", "-w", "-I", "DOCKER-USER", "-s", "203.0.113.9", "-j", "DROP")
    script = write_script(
        tmp_path / "vllm-firewall", vllm_service_firewall_allowed_cidrs=["10.0.0.0/8"]
    )
    docker_host.run(str(script), "apply")
    docker_host.run(str(script), "apply")
    chain = [r for r in docker_host.rules() if r.startswith("-A DOCKER-USER")]
    assert chain == [
        f"-A DOCKER-USER -j {CHAIN}",
        "-A DOCKER-USER -s 203.0.113.9/32 -j DROP",
        "-A DOCKER-USER -j RETURN",
    ]
    docker_host.run(str(script), "remove")
    assert [r for r in docker_host.rules() if r.startswith("-A DOCKER-USER")] == chain[1:]


@needs_netns
def test_remove_restores_dockers_chains_and_says_when_there_was_nothing(docker_host, tmp_path):
    script = write_script(
        tmp_path / "vllm-firewall", vllm_service_firewall_allowed_cidrs=["10.0.0.0/8"]
    )
    docker_host.run(str(script), "apply")
    removed = docker_host.run(str(script), "remove")
    assert removed.stdout.startswith("removed the vLLM API firewall rules"), removed.stdout
    assert docker_host.rules() == DOCKER_USER
    again = docker_host.run(str(script), "remove")
    assert again.stdout.strip() == "no vLLM API firewall rules to remove"
    assert docker_host.rules() == DOCKER_USER


@needs_netns
def test_apply_fails_loudly_without_dockers_chain(namespaces, backend_path, tmp_path):
    bare = Netns(backend_path)
    namespaces.append(bare)
    script = write_script(
        tmp_path / "vllm-firewall", vllm_service_firewall_allowed_cidrs=["10.0.0.0/8"]
    )
    result = bare.run(str(script), "apply", check=False)
    assert result.returncode == 1
    assert "no DOCKER-USER chain" in result.stderr and '"iptables": false' in result.stderr
    assert bare.rules() == []
    usage = bare.run(str(script), check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr


# --- real connections through a Docker-like published port -------------------------------------

# The client namespace has an allowed and a disallowed address; the host publishes port
# 18000 on its client-side address and DNATs it to the container's port 8000, like
# `docker run -p 18000:8000`.
HOST_ADDRESS, ALLOWED, DISALLOWED = "10.1.0.1", "10.1.0.2", "10.1.0.3"
BRIDGE, CONTAINER = "172.30.0.1", "172.30.0.2"
PUBLISHED, CONTAINER_PORT = 18000, 8000

CONNECT = """
import socket, sys
source, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    with socket.create_connection((address, port), timeout=3, source_address=(source, 0)) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        print("answered" if s.recv(5) == b"HTTP/" else "no answer")
except ConnectionRefusedError:
    print("refused")
except ConnectionResetError:
    print("reset")
except TimeoutError:
    print("timed out")
"""


def _wait_listening(ns: Netns, address: str, port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while ns.run(sys.executable, "-c", CONNECT, address, address, str(port)).stdout.strip() != (
        "answered"
    ):
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        assert time.monotonic() < deadline, f"nothing answered on {address}:{port}"
        time.sleep(0.1)


@pytest.fixture
def published(namespaces, docker_host, backend_path) -> Iterator[dict[str, Netns]]:
    host = docker_host
    client, container = Netns(backend_path), Netns(backend_path)
    namespaces += [client, container]
    # A cable from the host to each: the host's end named here, the other end eth0 inside.
    for host_end, ns in (("vclient", client), ("vbridge", container)):
        host.run(*f"ip link add {host_end} type veth peer name eth0 netns {ns.pid}".split())
    for ns, device, addresses in (
        (host, "vclient", [HOST_ADDRESS]),
        (host, "vbridge", [BRIDGE]),
        (client, "eth0", [ALLOWED, DISALLOWED]),
        (container, "eth0", [CONTAINER]),
    ):
        for address in addresses:
            ns.run("ip", "addr", "add", f"{address}/24", "dev", device)
        ns.run("ip", "link", "set", device, "up")
    client.run("ip", "route", "add", "default", "via", HOST_ADDRESS)
    container.run("ip", "route", "add", "default", "via", BRIDGE)
    host.run("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    # Docker's NAT for a published port: PREROUTING for other machines, OUTPUT for the host.
    for rule in (
        "-N DOCKER",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
        f"-A DOCKER ! -i vbridge -p tcp -m tcp --dport {PUBLISHED}"
        f" -j DNAT --to-destination {CONTAINER}:{CONTAINER_PORT}",
    ):
        host.run("iptables", "-w", "-t", "nat", *rule.split())
    servers = [
        container.start(
            sys.executable, "-m", "http.server", str(CONTAINER_PORT), "--bind", CONTAINER
        ),
        # Something outside on the API's port number, for the container's own connections.
        client.start(sys.executable, "-m", "http.server", str(PUBLISHED), "--bind", ALLOWED),
    ]
    try:
        _wait_listening(container, CONTAINER, CONTAINER_PORT, servers[0])
        _wait_listening(client, ALLOWED, PUBLISHED, servers[1])
        yield {"host": host, "client": client, "container": container}
    finally:
        for server in servers:
            server.kill()
            server.wait()


def _connect(ns: Netns, source: str, address: str, port: int) -> str:
    return ns.run(sys.executable, "-c", CONNECT, source, address, str(port)).stdout.strip()


@needs_netns
def test_only_allowed_sources_reach_the_published_port(published, tmp_path):
    host, client, container = published["host"], published["client"], published["container"]
    # Without rules, both client addresses reach the server through the published port.
    assert _connect(client, DISALLOWED, HOST_ADDRESS, PUBLISHED) == "answered"

    script = write_script(
        tmp_path / "vllm-firewall",
        vllm_service_port=PUBLISHED,
        vllm_service_firewall_allowed_cidrs=[ALLOWED, "192.0.2.0/24"],
    )
    host.run(str(script), "apply")
    assert _connect(client, ALLOWED, HOST_ADDRESS, PUBLISHED) == "answered"
    # Refused at once (TCP reset), like a closed port, rather than left to time out.
    assert _connect(client, DISALLOWED, HOST_ADDRESS, PUBLISHED) == "refused"
    # The host itself (readiness and health probes) goes through OUTPUT, not FORWARD.
    assert _connect(host, HOST_ADDRESS, HOST_ADDRESS, PUBLISHED) == "answered"
    # Only the published port is filtered: routed traffic to the container's own address,
    # and the container's outgoing connections to that port number elsewhere, pass.
    assert _connect(client, DISALLOWED, CONTAINER, CONTAINER_PORT) == "answered"
    assert _connect(container, CONTAINER, ALLOWED, PUBLISHED) == "answered"

    host.run(str(script), "remove")
    assert _connect(client, DISALLOWED, HOST_ADDRESS, PUBLISHED) == "answered"


# --- the exporters' firewall (monitoring_exporter_listen_address beyond loopback) --------------

MONITORING = ROOT / "ansible" / "roles" / "monitoring"
INPUT_CHAIN, FORWARD_CHAIN = "SERVEKIT-EXPORTERS", "SERVEKIT-DCGM"
NODE_PORT = 19100  # node_exporter, a process of the host namespace


def write_exporters_script(path: Path, dcgm: bool, **variables) -> Path:
    """The monitoring role's `exporters-firewall` for a host whose exporters listen on
    HOST_ADDRESS (``dcgm``: a GPU host, which also runs the DCGM exporter)."""
    variables = {
        "monitoring_exporter_listen_address": HOST_ADDRESS,
        "monitoring_exporter_allowed_cidrs": [ALLOWED],
        "monitoring_node_exporter_port": NODE_PORT,
        "monitoring_dcgm_exporter_port": PUBLISHED,
        "_monitoring_firewall_dcgm": dcgm,
        **variables,
    }
    path.write_text(render("exporters-firewall.j2", role=MONITORING, **variables))
    path.chmod(0o755)
    return path


def node_match(port: int = NODE_PORT, dest: str = HOST_ADDRESS) -> str:
    """The INPUT match of node_exporter's rules as `iptables -S` prints it."""
    return f"-d {dest}/32 -p tcp -m tcp --dport {port}"


def test_exporters_unit_applies_before_the_exporters_and_after_docker_on_gpu_hosts():
    gpu = set(
        render(
            "exporters-firewall.service.j2",
            role=MONITORING,
            monitoring_exporter_listen_address=HOST_ADDRESS,
            _monitoring_firewall_dcgm=True,
        ).splitlines()
    )
    script = "/usr/local/libexec/servekit/exporters-firewall"
    assert {
        "After=docker.service",
        "PartOf=docker.service",
        "Before=prometheus-node-exporter.service dcgm-exporter.service",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"ExecStart={script} apply",
        f"ExecReload={script} apply",
        "WantedBy=multi-user.target prometheus-node-exporter.service docker.service"
        " dcgm-exporter.service",
    } <= gpu, gpu
    # A host without the DCGM exporter (the Prometheus host, a CPU host) may have no Docker.
    other = render(
        "exporters-firewall.service.j2",
        role=MONITORING,
        monitoring_exporter_listen_address=HOST_ADDRESS,
        _monitoring_firewall_dcgm=False,
    )
    assert not [line for line in other.splitlines() if "docker" in line or "dcgm" in line], other
    assert "Before=prometheus-node-exporter.service" in other.splitlines()
    assert "WantedBy=multi-user.target prometheus-node-exporter.service" in other.splitlines()


def by_chain(rules: list[str]) -> dict[str, list[str]]:
    """`iptables -S` lines grouped by chain, in order (the backends list chains differently)."""
    chains: dict[str, list[str]] = {}
    for rule in rules:
        chains.setdefault(rule.split()[1], []).append(rule)
    return chains


@needs_netns
def test_exporters_apply_installs_both_chains_and_is_idempotent(docker_host, tmp_path):
    script = write_exporters_script(
        tmp_path / "exporters-firewall",
        dcgm=True,
        monitoring_exporter_allowed_cidrs=["10.1.0.2", "192.168.0.0/16"],
    )
    dcgm = match(PUBLISHED, HOST_ADDRESS)
    expected = {
        "INPUT": [f"-A INPUT -j {INPUT_CHAIN}"],
        "FORWARD": ["-A FORWARD -j DOCKER-USER"],
        "DOCKER-USER": [
            "-N DOCKER-USER",
            f"-A DOCKER-USER -j {FORWARD_CHAIN}",
            "-A DOCKER-USER -j RETURN",
        ],
        # The host itself first, then the allowed sources; the rest of the port is reset.
        INPUT_CHAIN: [
            f"-N {INPUT_CHAIN}",
            f"-A {INPUT_CHAIN} -i lo -j RETURN",
            f"-A {INPUT_CHAIN} -s 10.1.0.2/32 {node_match()} -j RETURN",
            f"-A {INPUT_CHAIN} -s 192.168.0.0/16 {node_match()} -j RETURN",
            f"-A {INPUT_CHAIN} {node_match()} -j REJECT --reject-with tcp-reset",
        ],
        FORWARD_CHAIN: [
            f"-N {FORWARD_CHAIN}",
            f"-A {FORWARD_CHAIN} -s 10.1.0.2/32 {dcgm} -j RETURN",
            f"-A {FORWARD_CHAIN} -s 192.168.0.0/16 {dcgm} -j RETURN",
            f"-A {FORWARD_CHAIN} {dcgm} -j REJECT --reject-with tcp-reset",
        ],
    }
    first = docker_host.run(str(script), "apply")
    assert (
        f"exporters on {HOST_ADDRESS} (node_exporter port {NODE_PORT}, DCGM exporter port"
        f" {PUBLISHED}): connections from other machines allowed from 10.1.0.2, 192.168.0.0/16 only"
    ) in first.stdout, first.stdout
    assert by_chain(docker_host.rules()) == expected
    # Every run of the unit (boot, Docker restart, reload) applies again: one jump, same rules.
    docker_host.run(str(script), "apply")
    docker_host.run(str(script), "apply")
    assert by_chain(docker_host.rules()) == expected


@needs_netns
def test_exporters_firewall_needs_no_docker_without_the_dcgm_exporter(
    namespaces, backend_path, tmp_path
):
    """The Prometheus host runs node_exporter but no Docker: INPUT alone, no DOCKER-USER."""
    bare = Netns(backend_path)
    namespaces.append(bare)
    script = write_exporters_script(tmp_path / "exporters-firewall", dcgm=False)
    bare.run(str(script), "apply")
    assert by_chain(bare.rules()) == {
        "INPUT": [f"-A INPUT -j {INPUT_CHAIN}"],
        INPUT_CHAIN: [
            f"-N {INPUT_CHAIN}",
            f"-A {INPUT_CHAIN} -i lo -j RETURN",
            f"-A {INPUT_CHAIN} -s {ALLOWED}/32 {node_match()} -j RETURN",
            f"-A {INPUT_CHAIN} {node_match()} -j REJECT --reject-with tcp-reset",
        ],
    }
    removed = bare.run(str(script), "remove")
    assert removed.stdout.startswith("removed the exporters' firewall rules"), removed.stdout
    assert bare.rules() == []
    again = bare.run(str(script), "remove")
    assert again.stdout.strip() == "no exporters' firewall rules to remove"


@needs_netns
def test_exporters_apply_fails_loudly_on_a_gpu_host_without_dockers_chain(
    namespaces, backend_path, tmp_path
):
    bare = Netns(backend_path)
    namespaces.append(bare)
    script = write_exporters_script(tmp_path / "exporters-firewall", dcgm=True)
    result = bare.run(str(script), "apply", check=False)
    assert result.returncode == 1
    assert "no DOCKER-USER chain" in result.stderr and "DCGM exporter" in result.stderr
    assert bare.rules() == []


@needs_netns
def test_exporters_firewall_drops_the_dcgm_rules_when_the_host_stops_running_it(
    docker_host, tmp_path
):
    script = tmp_path / "exporters-firewall"
    docker_host.run(str(write_exporters_script(script, dcgm=True)), "apply")
    docker_host.run(str(write_exporters_script(script, dcgm=False)), "apply")
    rules = docker_host.rules()
    assert not [r for r in rules if FORWARD_CHAIN in r], rules
    assert f"-A INPUT -j {INPUT_CHAIN}" in rules
    # Removing leaves what Docker made, as before the first apply.
    docker_host.run(str(script), "remove")
    assert docker_host.rules() == DOCKER_USER


@needs_netns
def test_only_the_host_and_allowed_scrapers_reach_the_exporters(published, tmp_path):
    """Real connections: node_exporter as a host process on HOST_ADDRESS:NODE_PORT, the DCGM
    exporter behind a Docker-like publish of HOST_ADDRESS:PUBLISHED, and another service of
    the host (SSH, say) on HOST_ADDRESS:OTHER_PORT that the rules must leave alone."""
    host, client = published["host"], published["client"]
    other_port = 19999
    servers = [
        host.start(sys.executable, "-m", "http.server", str(port), "--bind", HOST_ADDRESS)
        for port in (NODE_PORT, other_port)
    ]
    try:
        _wait_listening(host, HOST_ADDRESS, NODE_PORT, servers[0])
        _wait_listening(host, HOST_ADDRESS, other_port, servers[1])
        # Without rules, both client addresses reach both exporters.
        for port in (NODE_PORT, PUBLISHED):
            assert _connect(client, DISALLOWED, HOST_ADDRESS, port) == "answered"

        script = write_exporters_script(tmp_path / "exporters-firewall", dcgm=True)
        host.run(str(script), "apply")
        for port in (NODE_PORT, PUBLISHED):
            assert _connect(client, ALLOWED, HOST_ADDRESS, port) == "answered", port
            # Reset at once, like a closed port, rather than left to time out.
            assert _connect(client, DISALLOWED, HOST_ADDRESS, port) == "refused", port
            # The host itself (Prometheus on the host, the role's readiness waits).
            assert _connect(host, HOST_ADDRESS, HOST_ADDRESS, port) == "answered", port
        # Only the exporters' ports are filtered.
        assert _connect(client, DISALLOWED, HOST_ADDRESS, other_port) == "answered"
        assert _connect(client, DISALLOWED, CONTAINER, CONTAINER_PORT) == "answered"

        host.run(str(script), "remove")
        for port in (NODE_PORT, PUBLISHED):
            assert _connect(client, DISALLOWED, HOST_ADDRESS, port) == "answered", port
    finally:
        for server in servers:
            server.kill()
            server.wait()

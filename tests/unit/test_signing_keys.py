"""Repository signing keys are trusted only with the fingerprint the roles ship.

docker_engine, nvidia_driver and nvidia_container_toolkit install every repository key through
the signing_key role: download to a staging file, read the primary-key fingerprints on the
control node (the `servekit_openpgp_fingerprints` filter), install only when the file holds
exactly the expected key. These tests

- check the filter against gpg, on the published keys in tests/fixtures/keys and on keys made
  here (binary and armoured, RSA and Ed25519, keyrings of several keys);
- check that the fingerprints the roles ship are those of the published keys;
- run the signing_key role with ansible-playbook against this machine (local connection, every
  path in a temporary directory, keys served from file:// URLs), with the variable names each
  calling role passes: a mismatch is refused naming the variable, a match installs the key, a
  second run changes nothing and downloads nothing.

gpg must be installed (Debian: `apt-get install gnupg`); the tests fail, not skip, without it.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import servekit_openpgp as openpgp  # ansible/plugins/filter, on pytest's pythonpath
import yaml
from ansible_local import local_ansible_env
from test_gpu_roles import Role  # the roles' variables, templated by Ansible

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
ROLES = ANSIBLE / "roles"
KEYS = ROOT / "tests" / "fixtures" / "keys"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


GPG = shutil.which("gpg")
TASK_HEADER = re.compile(r"^TASK \[(?:[\w.]+ : )?(.*)\] \*+\s*$")
REFUSAL_TASK = "Signing key | Refuse a key whose fingerprint is not the expected one"


def _need_gpg() -> str:
    if GPG is None:
        pytest.fail(
            "gpg is not installed; these tests need it (Debian/Ubuntu: apt-get install gnupg)"
        )
    return GPG


def gpg_fingerprints(path: Path, home: Path) -> list[tuple[str, str]]:
    """(record type, fingerprint) of every key in ``path``, as gpg reads it (``home``: an
    empty GNUPGHOME, so no keyring of this machine is read or written)."""
    out = _gpg(home, "--show-keys", "--with-colons", str(path))
    records, kind = [], None
    for line in out.splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub"):
            kind = fields[0]
        elif fields[0] == "fpr" and kind:
            records.append((kind, fields[9]))
            kind = None
    return records


# --- the filter against gpg -------------------------------------------------------------


PUBLISHED = sorted(KEYS.glob("*.asc"))


@pytest.fixture
def gnupg_home(tmp_path) -> Path:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    return home


def test_the_published_keys_are_here():
    assert [k.name for k in PUBLISHED] == [
        "docker-ce-deb.asc",
        "docker-ce-rpm.asc",
        "epel-9.asc",
        "libnvidia-container.asc",
    ]


@pytest.mark.parametrize("key", PUBLISHED, ids=[k.stem for k in PUBLISHED])
def test_fingerprints_of_published_keys_agree_with_gpg(key, gnupg_home):
    by_gpg = gpg_fingerprints(key, gnupg_home)
    assert openpgp.fingerprints(key.read_text()) == [f for kind, f in by_gpg if kind == "pub"]
    assert openpgp.fingerprints(key.read_bytes(), subkeys=True) == [f for _, f in by_gpg]
    # As slurp and servekit_file_state hand it over: base64 of the file.
    assert openpgp.fingerprints(
        base64.b64encode(key.read_bytes()).decode()
    ) == openpgp.fingerprints(key.read_text())


def _fixture_fingerprint(name: str) -> str:
    (fingerprint,) = openpgp.fingerprints((KEYS / name).read_text())
    return fingerprint


@pytest.mark.parametrize(
    ("role", "os_name", "variable", "key"),
    [
        ("docker_engine", "ubuntu2404", "_docker_engine_repo_key_fingerprint", "docker-ce-deb.asc"),
        ("docker_engine", "rocky9", "_docker_engine_repo_key_fingerprint", "docker-ce-rpm.asc"),
        (
            "nvidia_container_toolkit",
            "ubuntu2204",
            "nvidia_container_toolkit_repo_key_fingerprint",
            "libnvidia-container.asc",
        ),
        (
            "nvidia_container_toolkit",
            "rhel9",
            "nvidia_container_toolkit_repo_key_fingerprint",
            "libnvidia-container.asc",
        ),
        ("nvidia_driver", "rocky9", "nvidia_driver_epel_repo_key_fingerprint", "epel-9.asc"),
    ],
)
def test_shipped_fingerprints_are_those_of_the_published_keys(role, os_name, variable, key):
    assert Role(role, os_name)[variable] == _fixture_fingerprint(key)


def test_cuda_repository_fingerprints_follow_the_os():
    """No copy of NVIDIA's CUDA keys is at hand; the values are those NVIDIA's
    cuda-repo-management SIGNATURES.md shows gpg printing for 3bf863cc.pub and D42D0685.pub."""
    for os_name in ("ubuntu2204", "ubuntu2404", "debian12"):
        role = Role("nvidia_driver", os_name)
        assert (
            role["nvidia_driver_repo_key_fingerprint"] == "EB693B3035CD5710E231E123A4B469963BF863CC"
        )
        assert role["nvidia_driver_repo_key_url"].endswith("/3bf863cc.pub")
        assert role["nvidia_driver_epel_repo_key_fingerprint"] == ""
    for os_name in ("rocky9", "rhel9"):
        role = Role("nvidia_driver", os_name)
        assert (
            role["nvidia_driver_repo_key_fingerprint"] == "610C7B14E068A878070DA4E99CD0A493D42D0685"
        )
        assert role["nvidia_driver_repo_key_url"].endswith("/D42D0685.pub")


def test_docker_engine_takes_a_fingerprint_set_for_a_mirror():
    mirror = "AAAA BBBB CCCC DDDD EEEE FFFF 0000 1111 2222 3333"
    role = Role("docker_engine", "ubuntu2204", docker_engine_repo_key_fingerprint=mirror)
    assert role["_docker_engine_repo_key_fingerprint"] == mirror


@dataclass(frozen=True)
class Keys:
    home: Path
    rsa: Path  # armoured, one primary key with a signing subkey
    ed25519: Path  # binary
    both: Path  # armoured keyring: the RSA key, then the Ed25519 key
    rsa_fpr: str
    ed25519_fpr: str


def _gpg(home: Path, *args: str) -> str:
    return subprocess.run(
        [_need_gpg(), "--batch", "--no-tty", "--homedir", str(home), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two throw-away keys made in a temporary GNUPGHOME."""
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    out = tmp_path_factory.mktemp("keys")
    try:
        _gpg(
            home,
            "--passphrase",
            "",
            "--quick-gen-key",
            "Test RSA <rsa@example.invalid>",
            "rsa2048",
            "cert",
            "never",
        )
        rsa_fpr = _primary(home, "rsa@example.invalid")
        _gpg(home, "--passphrase", "", "--quick-add-key", rsa_fpr, "rsa2048", "sign", "never")
        _gpg(
            home,
            "--passphrase",
            "",
            "--quick-gen-key",
            "Test Ed <ed@example.invalid>",
            "ed25519",
            "sign",
            "never",
        )
        ed_fpr = _primary(home, "ed@example.invalid")
        (out / "rsa.asc").write_text(_gpg(home, "--armor", "--export", rsa_fpr))
        ed = subprocess.run(
            [_need_gpg(), "--batch", "--homedir", str(home), "--export", ed_fpr],
            capture_output=True,
            check=True,
        ).stdout
        (out / "ed25519.gpg").write_bytes(ed)
        (out / "both.asc").write_text(_gpg(home, "--armor", "--export", rsa_fpr, ed_fpr))
        yield Keys(home, out / "rsa.asc", out / "ed25519.gpg", out / "both.asc", rsa_fpr, ed_fpr)
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True
        )


def _primary(home: Path, uid: str) -> str:
    for line in _gpg(home, "--with-colons", "--list-keys", uid).splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    raise AssertionError(f"no key for {uid}")


def test_fingerprints_of_made_keys_agree_with_gpg(keys):
    for path in (keys.rsa, keys.ed25519, keys.both):
        by_gpg = gpg_fingerprints(path, keys.home)
        assert openpgp.fingerprints(path.read_bytes(), subkeys=True) == [f for _, f in by_gpg]
        assert openpgp.fingerprints(path.read_bytes()) == [f for kind, f in by_gpg if kind == "pub"]
    assert openpgp.fingerprints(keys.rsa.read_text()) == [keys.rsa_fpr]
    assert len(openpgp.fingerprints(keys.rsa.read_text(), subkeys=True)) == 2
    assert openpgp.fingerprints(keys.ed25519.read_bytes()) == [keys.ed25519_fpr]
    assert openpgp.fingerprints(keys.both.read_text()) == [keys.rsa_fpr, keys.ed25519_fpr]
    # Two armoured blocks in one file count as one keyring.
    two = keys.rsa.read_text() + "\n" + _gpg(keys.home, "--armor", "--export", keys.ed25519_fpr)
    assert openpgp.fingerprints(two) == [keys.rsa_fpr, keys.ed25519_fpr]


@pytest.mark.parametrize(
    "data",
    [
        "",
        "not a key",
        "<html><body>Moved</body></html>",
        base64.b64encode(b"\x00\x01\x02").decode(),
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!!\n-----END PGP PUBLIC KEY BLOCK-----\n",
        b"\x99\x01",  # a packet header promising more than there is
    ],
)
def test_anything_but_a_public_key_has_no_fingerprint(data):
    assert openpgp.fingerprints(data) == []


def test_fingerprints_are_compared_in_one_spelling():
    assert openpgp.normalize("9DC8 5822 9FC7 DD38 854A  E2D8 8D81 803C 0EBF CD88") == (
        "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
    )
    assert openpgp.normalize("0x9dc858229fc7dd38854ae2d88d81803c0ebfcd88") == (
        "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
    )
    assert openpgp.is_fingerprint("9DC8 5822 9FC7 DD38 854A E2D8 8D81 803C 0EBF CD88")
    assert openpgp.is_fingerprint("A" * 64)  # v6
    assert not openpgp.is_fingerprint("0EBFCD88")  # a short key ID
    assert not openpgp.is_fingerprint("8D81803C0EBFCD88")  # a long key ID
    assert not openpgp.is_fingerprint("")
    assert not openpgp.is_fingerprint("G" * 40)


# --- the signing_key role, run by ansible-playbook ---------------------------------------


def _callers() -> list[tuple[str, str, dict]]:
    """(role, tasks file, vars) of every task that includes the signing_key role."""
    found = []
    for tasks in sorted(ROLES.glob("*/tasks/*.yml")):
        for task in _walk(yaml.safe_load(tasks.read_text()) or []):
            include = task.get("ansible.builtin.include_role") or {}
            if include.get("name") == "signing_key":
                found.append((tasks.parts[-3], tasks.name, task["vars"]))
    return found


def _walk(tasks: list[dict]):
    for task in tasks:
        yield task
        for section in ("block", "rescue", "always"):
            yield from _walk(task.get(section, []))


CALLERS = _callers()


def test_every_repository_key_goes_through_the_fingerprint_check():
    roles = {role for role, _, _ in CALLERS}
    assert roles == {"docker_engine", "nvidia_driver", "nvidia_container_toolkit"}
    # Docker (apt, dnf), CUDA (apt, dnf), EPEL (dnf), the toolkit's repository (apt, dnf).
    assert len(CALLERS) == 7
    for role, tasks_file, variables in CALLERS:
        name = variables["signing_key_fingerprint_name"]
        # The variable named in the refusal is the role's own, and the one the check uses.
        assert name.startswith(role + "_") and name.endswith("_key_fingerprint"), (role, name)
        assert name in variables["signing_key_fingerprint"], (role, tasks_file)
        assert variables["signing_key_url_name"] in variables["signing_key_url"], (role, tasks_file)
    # No role fetches a key another way.
    for tasks in ROLES.glob("*/tasks/*.yml"):
        if tasks.parts[-3] == "signing_key":
            continue
        for task in _walk(yaml.safe_load(tasks.read_text()) or []):
            assert not {"ansible.builtin.apt_key", "ansible.builtin.rpm_key"} & set(task), tasks
            fetch = task.get("ansible.builtin.get_url") or {}
            where = f"{fetch.get('url', '')} {fetch.get('dest', '')}".lower()
            assert not re.search(r"gpg|key|\.asc\b|\.pub\b", where), (tasks, task.get("name"))


@dataclass
class Result:
    """What one ansible-playbook run did on one inventory host."""

    ran: list[str]  # tasks that ran on the host (not skipped), in order
    failed_task: str | None
    message: str | None  # "msg" of the failed task
    changed: int | None  # from the recap


@dataclass
class Case:
    """One target: this machine reached over a local connection under its own inventory name,
    with its own key path and served key file in the test's directory."""

    name: str
    fingerprint: str
    served: bytes | str | None  # what the key URL serves (None: nothing)
    installed: bytes | None = None  # a key file already on the host
    names: tuple[str, str] = ("docker_engine_repo_key_fingerprint", "docker_engine_repo_key_url")


class Target:
    """Runs the signing_key role with ansible-playbook against this machine, for several cases
    at once (one inventory host each), every path in ``workdir``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.staging = workdir / "staging"  # TMPDIR of the run: where the staging files go
        self.staging.mkdir()

    def path(self, case: str) -> Path:
        return self.workdir / case / "keyrings" / "repo.asc"

    def served(self, case: str) -> Path:
        return self.workdir / case / "served.asc"

    def prepare(self, case: Case) -> None:
        (self.workdir / case.name).mkdir()
        if case.served is not None:
            data = case.served if isinstance(case.served, bytes) else case.served.encode()
            self.served(case.name).write_bytes(data)
        if case.installed is not None:
            self.path(case.name).parent.mkdir(mode=0o755)
            self.path(case.name).write_bytes(case.installed)

    def run(self, cases: list[Case], check: bool = False) -> tuple[str, dict[str, Result]]:
        hosts = {
            case.name: {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "signing_key_url": self.served(case.name).as_uri(),
                "signing_key_path": str(self.path(case.name)),
                "signing_key_fingerprint": case.fingerprint,
                "signing_key_fingerprint_name": case.names[0],
                "signing_key_url_name": case.names[1],
                "signing_key_owner": pwd.getpwuid(os.getuid()).pw_name,
                "signing_key_group": grp.getgrgid(os.getgid()).gr_name,
            }
            for case in cases
        }
        (self.workdir / "hosts.yml").write_text(json.dumps({"all": {"hosts": hosts}}, indent=2))
        play = [
            {
                "name": "Install a repository key",
                "hosts": "all",
                "gather_facts": False,
                "tasks": [
                    {
                        "name": "Install the key, checked against its fingerprint",
                        "ansible.builtin.include_role": {"name": "signing_key"},
                    }
                ],
            }
        ]
        (self.workdir / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
        env = local_ansible_env(
            self.workdir, ANSIBLE_ROLES_PATH=str(ROLES), TMPDIR=str(self.staging)
        )
        cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(self.workdir / "hosts.yml")]
        cmd += [str(self.workdir / "play.yml")] + (["--check"] if check else [])
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        results = {case.name: Result([], None, None, None) for case in cases}
        task = ""
        for line in proc.stdout.splitlines():
            if header := TASK_HEADER.match(line):
                task = header.group(1)
            elif status := RESULT_LINE.match(line):
                kind, host = status.group(1), status.group(2)
                if host in results and kind != "skipping":
                    results[host].ran.append(task)
                if host in results and kind == "fatal":
                    results[host].failed_task = task
                    results[host].message = json.loads(line.split(" => ", 1)[1]).get("msg")
            elif (recap := RECAP_LINE.match(line)) and recap.group(1) in results:
                results[recap.group(1)].changed = int(recap.group(2))
        return proc.stdout + proc.stderr, results

    def staged_files(self) -> list[str]:
        return [p.name for p in self.staging.iterdir() if p.name.endswith(".signing-key")]


RESULT_LINE = re.compile(r"^(ok|changed|skipping|fatal): \[([^\]]+)\]")
RECAP_LINE = re.compile(r"^(\S+)\s*: ok=\d+\s+changed=(\d+)")
DOWNLOAD_TASK = "Signing key | Download the key to the staging file"


@pytest.fixture(scope="module")
def applied(tmp_path_factory, keys):
    """Every case in one run: the seven callers' names with a key that is not theirs, and the
    installs; then a second run of the installs with nothing served, then a check-mode plan."""
    target = Target(tmp_path_factory.mktemp("target"))
    rsa, ed25519, both = keys.rsa.read_text(), keys.ed25519.read_bytes(), keys.both.read_text()
    cases = [
        Case(
            f"refuse-{index}",
            keys.ed25519_fpr,
            rsa,
            names=(v["signing_key_fingerprint_name"], v["signing_key_url_name"]),
        )
        for index, (_, _, v) in enumerate(CALLERS)
    ]
    # Written as people copy fingerprints: groups of four, lower case.
    spaced = " ".join(keys.rsa_fpr.lower()[i : i + 4] for i in range(0, 40, 4))
    cases += [
        Case("install", spaced, rsa),
        Case("replace", keys.rsa_fpr, rsa, installed=ed25519),  # a stale or planted key
        Case("extra-key", keys.rsa_fpr, both),
        Case("not-a-key", keys.rsa_fpr, "<html><body>Please log in to the proxy</body></html>\n"),
    ]
    for case in cases:
        target.prepare(case)
    output, first = target.run(cases)
    staged_after_first = target.staged_files()
    # A converged host: nothing served any more, so a download would fail.
    target.served("install").unlink()
    again_output, again = target.run([Case("install", keys.rsa_fpr, None)])
    plan = Case("plan", keys.rsa_fpr, rsa)
    target.prepare(plan)
    plan_output, planned = target.run([plan], check=True)
    return {
        "target": target,
        "cases": {case.name: case for case in cases},
        "first": first,
        "output": output,
        "staged_after_first": staged_after_first,
        "again": again["install"],
        "again_output": again_output,
        "plan": planned["plan"],
        "plan_output": plan_output,
    }


@pytest.mark.parametrize("index", range(len(CALLERS)), ids=[f"{r}/{t}" for r, t, _ in CALLERS])
def test_a_key_with_another_fingerprint_is_refused_naming_the_variable(applied, keys, index):
    _, _, variables = CALLERS[index]
    result = applied["first"][f"refuse-{index}"]
    assert result.failed_task == REFUSAL_TASK, applied["output"]
    message = result.message or ""
    # The message names the variable to set, the fix, the URL's variable and both fingerprints.
    assert f"set {variables['signing_key_fingerprint_name']} to it" in message, message
    assert variables["signing_key_url_name"] in message, message
    assert f"holds the key {keys.rsa_fpr}" in message, message
    assert f"expects only {keys.ed25519_fpr}" in message, message
    assert "It was not installed, and the repository was not added" in message, message
    assert not applied["target"].path(f"refuse-{index}").exists()


def test_staging_files_are_removed_after_refusals_and_installs(applied):
    assert applied["staged_after_first"] == [], applied["output"]


def test_the_expected_key_is_installed(applied, keys):
    result = applied["first"]["install"]
    assert result.failed_task is None, applied["output"]
    path = applied["target"].path("install")
    assert path.read_bytes() == keys.rsa.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o755"
    assert result.changed and result.changed > 0


def test_a_second_run_downloads_nothing_and_changes_nothing(applied):
    result = applied["again"]
    assert result.failed_task is None, applied["again_output"]
    assert result.changed == 0, applied["again_output"]
    assert DOWNLOAD_TASK not in result.ran


def test_an_installed_key_that_is_not_the_expected_one_is_replaced(applied, keys):
    result = applied["first"]["replace"]
    assert result.failed_task is None, applied["output"]
    assert applied["target"].path("replace").read_bytes() == keys.rsa.read_bytes()


def test_a_file_with_the_expected_key_and_another_is_refused(applied, keys):
    """apt trusts every key of a Signed-By file: an extra key would be trusted too."""
    result = applied["first"]["extra-key"]
    assert result.failed_task == REFUSAL_TASK, applied["output"]
    assert f"holds 2 keys: {keys.rsa_fpr}, {keys.ed25519_fpr}" in (result.message or "")
    assert not applied["target"].path("extra-key").exists()


def test_a_page_that_is_no_key_is_refused(applied):
    result = applied["first"]["not-a-key"]
    assert result.failed_task == REFUSAL_TASK, applied["output"]
    assert "holds no OpenPGP public key" in (result.message or ""), result.message
    assert not applied["target"].path("not-a-key").exists()


def test_a_check_mode_plan_downloads_nothing(applied):
    result = applied["plan"]
    assert result.failed_task is None, applied["plan_output"]
    assert DOWNLOAD_TASK not in result.ran
    assert not applied["target"].path("plan").exists()

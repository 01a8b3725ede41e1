"""Is the host converged: OS, Docker, the vLLM unit, its health timer, the port, the model."""

from __future__ import annotations

import json

from conftest import journal

SUPPORTED = {
    ("debian", "12"),
    ("ubuntu", "22.04"),
    ("ubuntu", "24.04"),
    ("rocky", "9"),
    ("rhel", "9"),
}


def test_os_is_supported(host):
    info = host.system_info
    release = info.release if info.distribution == "ubuntu" else info.release.split(".")[0]
    assert (info.distribution, release) in SUPPORTED, f"{info.distribution} {info.release}"
    assert host.run("uname -r").rc == 0


def test_docker_is_active_and_enabled(host):
    docker = host.service("docker")
    assert docker.is_running, journal(host, "docker")
    assert docker.is_enabled


def test_vllm_service_is_active_and_enabled(host):
    vllm = host.service("vllm")
    state = host.run(
        "systemctl show vllm --property=ActiveState,SubState,Result --value"
    ).stdout.split()
    assert vllm.is_running, f"vllm.service is {state}; journal:\n{journal(host, 'vllm')}"
    assert vllm.is_enabled, "vllm.service is not enabled: it would not come back after a reboot"


def test_vllm_service_is_not_restart_looping(host):
    show = host.run("systemctl show vllm --property=NRestarts,StartLimitBurst").stdout
    props = dict(line.split("=", 1) for line in show.split())
    restarts, burst = int(props["NRestarts"]), int(props["StartLimitBurst"])
    assert restarts < burst, (
        f"vllm.service restarted {restarts} times (start limit {burst}); journal:\n"
        + journal(host, "vllm")
    )


def test_health_timer_is_active(host):
    timer = host.service("vllm-health.timer")
    assert timer.is_running, journal(host, "vllm-health.service")
    assert timer.is_enabled


def test_api_port_listens_on_the_configured_address(host, hostvars):
    port, bind = hostvars["vllm_service_port"], hostvars["vllm_service_bind_address"]
    listening = [str(s) for s in host.socket.get_listening_sockets() if s.endswith(f":{port}")]
    assert listening, f"nothing listens on port {port}"
    expected = f"tcp://{bind}:{port}" if ":" not in bind else f"tcp://[{bind}]:{port}"
    wildcard = bind in ("0.0.0.0", "::")
    assert expected in listening or (wildcard and any(bind in s for s in listening)), (
        f"port {port} listens on {listening}, expected only {expected}"
    )
    others = [s for s in listening if bind not in s and not wildcard]
    assert not others, f"port {port} also listens on {others}"


def test_env_file_is_private(host):
    env = host.file("/etc/vllm/vllm.env")
    assert env.exists
    assert env.user == "root"
    assert env.mode == 0o600, f"/etc/vllm/vllm.env has mode {oct(env.mode)}, expected 0o600"


def test_container_runs_with_the_documented_flags(host, vllm_container):
    assert vllm_container is not None, "no container named vllm is running"
    hc = vllm_container["HostConfig"]
    assert hc["IpcMode"] == "host" or hc.get("ShmSize", 0) >= 1 << 30, (
        f"IpcMode={hc['IpcMode']} ShmSize={hc.get('ShmSize')}: "
        "vLLM needs --ipc=host or a big --shm-size"
    )
    assert "no-new-privileges" in (hc.get("SecurityOpt") or [])
    model_mounts = [m for m in vllm_container["Mounts"] if m["Destination"].startswith("/models/")]
    assert model_mounts, "the model is not mounted"
    assert all(not m["RW"] for m in model_mounts), "the model must be mounted read-only"


def test_container_args_hold_no_secret(host, vllm_container):
    assert vllm_container is not None
    args = " ".join(vllm_container["Args"])
    assert "--api-key" not in args, "the API key must come from the env file, not argv"
    ps = host.run("ps -eo args").stdout
    assert "VLLM_API_KEY" not in ps and "--api-key" not in ps


def test_model_matches_its_manifest(host, hostvars):
    current = f"{hostvars['servekit_model_root']}/{hostvars['servekit_model_id']}/current"
    manifest_file = host.file(f"{current}/.servekit-manifest.json")
    assert manifest_file.exists, f"{current} has no manifest: the model was never verified"
    manifest = json.loads(manifest_file.content_string)
    assert manifest["files"], "the manifest lists no files"
    for path, entry in manifest["files"].items():
        f = host.file(f"{current}/{path}")
        assert f.exists, f"{current}/{path} is missing"
        assert f.size == entry["size"], f"{path}: {f.size} bytes, manifest says {entry['size']}"
    assert host.file(f"{current}/config.json").exists

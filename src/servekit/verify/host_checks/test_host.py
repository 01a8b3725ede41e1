"""Is the host converged: OS, Docker, the vLLM unit, its health timer, the container (image,
flags, secrets), the port, the model. GPU checks are in test_gpu.py."""

from __future__ import annotations

import json
import time

import pytest

from servekit.checkout import repo_root
from servekit.images.registry import ImageRef, parse_reference
from servekit.verify.host_facts import (
    CONTAINER,
    ENV_FILE,
    GATE_DIR,
    GATE_FILE,
    UNIT_FILE,
    journal,
    redact,
    run_as_root,
)

SUPPORTED = {
    ("debian", "12"),
    ("ubuntu", "22.04"),
    ("ubuntu", "24.04"),
    ("rocky", "9"),
    ("rhel", "9"),
}
# Restart-count stability: poll /health this often, at least this many times, and until the
# server's process has lived through one interval of the health timer.
HEALTH_POLLS = 6
HEALTH_POLL_INTERVAL = 0.5


def test_os_is_supported(host):
    info = host.system_info
    release = info.release if info.distribution == "ubuntu" else info.release.split(".")[0]
    assert (info.distribution, release) in SUPPORTED, (
        f"expected one of {sorted(SUPPORTED)}, got {info.distribution} {info.release}"
    )
    kernel = host.run("uname -r")
    assert kernel.rc == 0 and kernel.stdout.strip(), f"uname -r failed: {kernel.stderr}"


def test_docker_is_active_and_enabled(host):
    docker = host.service("docker")
    assert docker.is_running, f"docker.service is not running; journal:\n{journal(host, 'docker')}"
    assert docker.is_enabled, "docker.service is not enabled: it would not come back after a reboot"


def test_vllm_service_is_active_and_enabled(host):
    vllm = host.service("vllm")
    state = host.run(
        "systemctl show vllm --property=ActiveState,SubState,Result --value"
    ).stdout.split()
    assert vllm.is_running, (
        f"expected vllm.service active/running, got {state}; journal:\n{journal(host, 'vllm')}"
    )
    assert vllm.is_enabled, "vllm.service is not enabled: it would not come back after a reboot"


def _service_props(host, *names: str) -> dict[str, str]:
    result = host.run("systemctl show vllm --property=%s", ",".join(names))
    props = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    missing = [n for n in names if n not in props]
    assert not missing, (
        f"expected `systemctl show vllm` to give {', '.join(names)}, got rc {result.rc}: "
        f"{(result.stdout + result.stderr).strip()[:300]}"
    )
    return props


def test_vllm_service_is_not_restart_looping(host):
    props = _service_props(host, "NRestarts", "StartLimitBurst")
    restarts, burst = int(props["NRestarts"]), int(props["StartLimitBurst"])
    assert restarts < burst, (
        f"expected fewer restarts than the start limit {burst}, got {restarts}; journal:\n"
        + journal(host, "vllm")
    )


def _health_url(hostvars) -> str:
    """/health as the host reaches it (what vllm-health-check polls)."""
    bind, port = str(hostvars["vllm_service_bind_address"]), hostvars["vllm_service_port"]
    if bind in ("0.0.0.0", "127.0.0.1", "localhost"):
        address = "127.0.0.1"
    elif bind in ("::", "::1"):
        address = "[::1]"
    else:
        address = f"[{bind}]" if ":" in bind else bind
    return f"http://{address}:{port}/health"


def _process_age(host, pid: str) -> int | None:
    """Seconds since process ``pid`` started on the host; None when there is no such process."""
    result = host.run("ps -o etimes= -p %s", pid)
    age = result.stdout.strip()
    return int(age) if result.rc == 0 and age.isdigit() else None


def test_restart_count_is_stable_while_serving(host, hostvars):
    """The server is not restarting in a loop: its process has lived through at least one
    interval of the health timer (waited for only when it started less than one interval ago),
    and neither NRestarts nor the main process changed while /health was polled, every poll
    answering 200. A unit that restarts in a loop can look active at any single moment; one
    that outlives a health-timer probe and does not restart while watched is not looping."""
    url = _health_url(hostvars)
    interval = int(hostvars["vllm_service_health_interval"])
    before = _service_props(host, "NRestarts", "MainPID", "ActiveState")
    codes: list[str] = []
    polled_enough = time.monotonic() + HEALTH_POLLS * HEALTH_POLL_INTERVAL
    while True:
        result = host.run(
            "curl --silent --output /dev/null --max-time 5 --write-out '%%{http_code}' %s", url
        )
        codes.append(result.stdout.strip() or f"curl rc {result.rc}")
        age = _process_age(host, before["MainPID"])
        if age is None:  # the process is gone: the checks below say how
            break
        if len(codes) >= HEALTH_POLLS and time.monotonic() >= polled_enough and age >= interval:
            break
        time.sleep(HEALTH_POLL_INTERVAL)
    after = _service_props(host, "NRestarts", "MainPID", "ActiveState")
    assert after["NRestarts"] == before["NRestarts"], (
        f"expected NRestarts to stay {before['NRestarts']} while polling {url}, "
        f"got {after['NRestarts']} (health answers: {codes}); journal:\n{journal(host, 'vllm')}"
    )
    assert after["MainPID"] == before["MainPID"] and after["ActiveState"] == "active", (
        f"expected vllm.service to stay active with MainPID {before['MainPID']}, got "
        f"{after['ActiveState']} with MainPID {after['MainPID']}; journal:\n{journal(host, 'vllm')}"
    )
    assert age is not None and age >= interval, (
        f"expected vllm.service's process {before['MainPID']} to outlive one health-timer "
        f"interval ({interval} s), got {age} s; journal:\n{journal(host, 'vllm')}"
    )
    assert set(codes) == {"200"}, (
        f"expected HTTP 200 from every poll of {url}, got {codes}; journal:\n"
        + journal(host, "vllm")
    )


def test_health_timer_is_active(host):
    timer = host.service("vllm-health.timer")
    assert timer.is_running, (
        f"vllm-health.timer is not active; journal:\n{journal(host, 'vllm-health.timer')}"
    )
    assert timer.is_enabled, "vllm-health.timer is not enabled"


def test_api_port_listens_on_the_configured_address(host, hostvars):
    port, bind = hostvars["vllm_service_port"], hostvars["vllm_service_bind_address"]
    listening = [str(s) for s in host.socket.get_listening_sockets() if s.endswith(f":{port}")]
    assert listening, f"expected a listener on {bind}:{port}, got nothing on port {port}"
    expected = f"tcp://{bind}:{port}" if ":" not in bind else f"tcp://[{bind}]:{port}"
    wildcard = bind in ("0.0.0.0", "::")
    assert expected in listening or (wildcard and any(bind in s for s in listening)), (
        f"expected port {port} on {expected} only, got {listening}"
    )
    others = [s for s in listening if bind not in s and not wildcard]
    assert not others, f"expected port {port} on {expected} only, it also listens on {others}"


def test_env_file_is_private(host):
    env = host.file(ENV_FILE)
    assert env.exists, f"{ENV_FILE} is missing"
    assert env.user == "root", f"expected {ENV_FILE} owned by root, got {env.user}"
    assert env.mode == 0o600, f"expected {ENV_FILE} mode 0o600, got {oct(env.mode)}"


def test_gate_settings_are_private(host):
    """The route gate's settings file holds the API key: root's alone, in a root-only directory."""
    for path, mode, kind in ((GATE_DIR, 0o700, "directory"), (GATE_FILE, 0o600, "file")):
        found = host.file(path)
        assert found.exists, f"{path} is missing: re-deploy"
        is_kind = found.is_directory if kind == "directory" else found.is_file
        assert is_kind and found.user == "root" and found.mode == mode, (
            f"expected {path} a {kind} owned by root, mode {oct(mode)}, got user {found.user}, "
            f"mode {oct(found.mode)}"
        )


def test_container_runs_with_the_documented_flags(host, vllm_container):
    assert vllm_container is not None, f"no container named {CONTAINER} is running"
    hc = vllm_container["HostConfig"]
    assert hc["IpcMode"] == "host" or hc.get("ShmSize", 0) >= 1 << 30, (
        f"expected --ipc=host or --shm-size >= 1g, got IpcMode={hc['IpcMode']} "
        f"ShmSize={hc.get('ShmSize')}: vLLM needs large shared memory"
    )
    assert "no-new-privileges" in (hc.get("SecurityOpt") or []), (
        f"expected SecurityOpt no-new-privileges, got {hc.get('SecurityOpt')}"
    )
    model_mounts = [m for m in vllm_container["Mounts"] if m["Destination"].startswith("/models/")]
    assert model_mounts, (
        f"expected the model mounted under /models/, got {vllm_container['Mounts']}"
    )
    writable = [m["Destination"] for m in model_mounts if m["RW"]]
    assert not writable, f"expected the model mounted read-only, got writable {writable}"


def test_compile_cache_lies_on_the_host(host, hostvars, vllm_container):
    """vLLM's cache root is vllm_service_compile_cache_dir on the host, so a restart loads what
    an earlier start compiled; root-only, as vLLM loads code from it; written by the server."""
    assert vllm_container is not None, f"no container named {CONTAINER} is running"
    cache = hostvars["vllm_service_compile_cache_dir"]
    env = dict(e.split("=", 1) for e in vllm_container["Config"].get("Env") or [])
    root = env.get("VLLM_CACHE_ROOT")
    mounted = {m["Destination"]: m for m in vllm_container["Mounts"]}
    if not cache:
        assert root is None or root not in mounted, (
            f"vllm_service_compile_cache_dir is empty, yet the cache root {root} is mounted"
        )
        return
    assert root and root in mounted, (
        f"expected VLLM_CACHE_ROOT set and mounted from {cache}, got VLLM_CACHE_ROOT={root}, "
        f"mounts {sorted(mounted)}: re-deploy"
    )
    mount = mounted[root]
    assert mount["Source"] == cache and mount["RW"], f"expected {cache} mounted read-write: {mount}"
    directory = host.file(cache)
    assert directory.is_directory and directory.user == "root" and directory.mode == 0o700, (
        f"expected {cache} a directory owned by root, mode 0o700 (vLLM loads code from it), "
        f"got user {directory.user}, mode {oct(directory.mode) if directory.exists else 'missing'}"
    )
    entries = host.run("ls -A %s", cache).stdout.split()
    assert entries, f"expected the server to have written its cache under {cache}, it is empty"


def _reference(value: str, source: str) -> ImageRef:
    try:
        return parse_reference(value)
    except ValueError as exc:
        pytest.fail(f"expected an image reference from {source}, got {value!r}: {exc}")


def _configured_image(
    host, inventory_vars, inventory_path, unit_image
) -> tuple[ImageRef | None, str]:
    """The image the host must run, and where that comes from: the inventory's
    `vllm_service_image` (pinned by hand; simple references to plain variables resolved),
    else the role's tag at the digest of the lock beside the inventory. For an inventory
    value that only Ansible can resolve, the lock's digest for the unit's tag; None when the
    lock has none either (nothing here says which image it must be)."""
    from servekit.images import lock
    from servekit.images.tags import TagError, locked_host_image
    from servekit.inventory import _plain

    name = host.backend.host
    path = lock.lock_path(inventory_path)
    raw = inventory_vars.get("vllm_service_image")
    if raw is not None:
        value = _plain(raw, {"inventory_hostname": name, **inventory_vars})
        if value is not None:
            source = "the inventory's vllm_service_image"
            return _reference(str(value), source), source
        unit = _reference(unit_image, UNIT_FILE)
        digest = lock.read_lock(path).get(unit.name) if unit.tag else None
        if not digest:
            return None, f"vllm_service_image is a template ({raw!r}) and {path} has no {unit.name}"
        return ImageRef(unit.registry, unit.repository, unit.tag, digest), str(path)
    try:
        image = locked_host_image(name, inventory_vars, inventory_path, repo_root())
    except TagError as exc:
        pytest.fail(f"expected the lock to hold the host's image: {exc}")
    return _reference(str(image), str(path)), str(path)


def test_container_runs_the_pinned_image(
    host, vllm_container, inventory_vars, inventory_path, unit_image
):
    """The running container's image is the configured digest (images.lock.yml's, by default)."""
    expected, source = _configured_image(host, inventory_vars, inventory_path, unit_image)
    if expected is None:
        # Nothing to hold the unit against: say so, and check the unit's own pin below.
        print(f"report: {source}; the unit's image {unit_image} is not compared")
        expected, source = _reference(unit_image, UNIT_FILE), UNIT_FILE
    else:
        assert parse_reference(unit_image) == expected, (
            f"expected {UNIT_FILE} to run {expected} (from {source}), got {unit_image}: "
            "the unit is stale, re-deploy"
        )
    assert expected.digest, (
        f"expected an image pinned by digest (...@sha256:...), got {expected} (from {source})"
    )
    assert vllm_container is not None, f"no container named {CONTAINER} is running"
    started_as = vllm_container["Config"]["Image"]
    assert started_as == unit_image, (
        f"expected the container started from {unit_image} ({UNIT_FILE}), got {started_as}: "
        "vllm.service was changed but not restarted"
    )
    image_id = vllm_container["Image"]
    result = host.run("docker image inspect %s", image_id)
    assert result.rc == 0, f"docker image inspect {image_id} failed: {result.stderr}"
    repo_digests = json.loads(result.stdout)[0].get("RepoDigests") or []
    running = {(r.registry, r.repository, r.digest) for r in map(parse_reference, repo_digests)}
    assert (expected.registry, expected.repository, expected.digest) in running, (
        f"expected the container's image {image_id} to be "
        f"{expected.registry}/{expected.repository}@{expected.digest} (from {source}), "
        f"got RepoDigests {repo_digests}"
    )


def test_server_reports_the_pinned_vllm_version(host, hostvars, pinned_vllm_version):
    """GET /version answers servekit_vllm_version (a local build suffix such as +cpu aside)."""
    url = _health_url(hostvars).removesuffix("/health") + "/version"
    result = host.run("curl --silent --show-error --max-time 10 %s", url)
    assert result.rc == 0, f"GET {url} failed: {result.stderr.strip()}"
    try:
        reported = str(json.loads(result.stdout)["version"])
    except (ValueError, KeyError, TypeError):
        pytest.fail(f'expected {{"version": ...}} from {url}, got {result.stdout[:200]!r}')
    assert reported.split("+", 1)[0] == pinned_vllm_version, (
        f"expected vLLM {pinned_vllm_version} (servekit_vllm_version) at {url}, got {reported}: "
        "the host runs another release; re-deploy, or update the lock (make lock-images)"
    )


def test_routes_off_the_allow_list_are_closed(host, hostvars):
    """vLLM routes its --api-key does not guard answer 404 from the route gate, even to the
    host itself (vllm_service_allowed_routes)."""
    base = _health_url(hostvars).removesuffix("/health")
    allowed = set(hostvars["vllm_service_allowed_routes"])
    curl = "curl --silent --output /dev/null --max-time 10 --write-out '%%{http_code}' %s"
    answers = {
        path: host.run(curl, base + path).stdout.strip()
        for path in ("/invocations", "/load", "/docs", "/openapi.json", "/metricsx")
        if path not in allowed
    }
    open_routes = {path: code for path, code in answers.items() if code != "404"}
    assert not open_routes, (
        f"expected 404 from the route gate, got {open_routes}: is the unit's --middleware "
        "servekit_gate.RouteGate in place (re-deploy)?"
    )


def _secret_places(host, vllm_container) -> dict[str, str]:
    """Where a secret must never show: process arguments and the unit's properties."""
    config = vllm_container.get("Config") or {}
    return {
        "systemctl show vllm": host.run("systemctl show vllm").stdout,
        "docker inspect (Path, Args, Cmd, Entrypoint)": json.dumps(
            {
                "Path": vllm_container.get("Path"),
                "Args": vllm_container.get("Args"),
                "Cmd": config.get("Cmd"),
                "Entrypoint": config.get("Entrypoint"),
            }
        ),
        "ps -eo args": host.check_output("ps -eo args"),
    }


def _lines_with(text: str, needle: str, secrets: dict[str, str]) -> str:
    hits = [line.strip() for line in text.splitlines() if needle in line]
    return redact("; ".join(hits), *secrets.values())[:400]


def test_api_key_appears_in_no_process_arguments(host, vllm_container, api_keys):
    """The key lives in the route gate's settings file only: not in argv, ExecStart or
    docker's args."""
    assert vllm_container is not None, f"no container named {CONTAINER} is running"
    places = _secret_places(host, vllm_container)
    leaks = {}
    for where, text in places.items():
        found = [origin for origin, key in api_keys.items() if key in text]
        if found:
            leaks[where] = (
                " and ".join(found) + ": " + _lines_with(text, api_keys[found[0]], api_keys)
            )
        elif "--api-key" in text:
            leaks[where] = "--api-key: " + _lines_with(text, "--api-key", api_keys)
    origin = ", ".join(api_keys) if api_keys else f"no key set in {GATE_FILE} or {ENV_FILE}"
    assert not leaks, (
        f"expected no API key in process arguments or unit properties ({origin}), got "
        + " | ".join(f"{where}: {what}" for where, what in leaks.items())
    )
    ps = places["ps -eo args"]
    assert "VLLM_API_KEY=" not in ps, (
        "expected VLLM_API_KEY in no command line, got: "
        + _lines_with(ps, "VLLM_API_KEY=", api_keys)
    )


def test_model_matches_its_manifest(host, hostvars, deep):
    """Every file of the manifest is there with its size; with `servekit verify --deep` also
    with its SHA-256 (every byte read on the host: minutes for a large model)."""
    current = f"{hostvars['servekit_model_root']}/{hostvars['servekit_model_id']}/current"
    manifest_file = host.file(f"{current}/.servekit-manifest.json")
    assert manifest_file.exists, f"{current} has no manifest: the model was never verified"
    manifest = json.loads(manifest_file.content_string)
    assert manifest["files"], "the manifest lists no files"
    for path, entry in manifest["files"].items():
        f = host.file(f"{current}/{path}")
        assert f.exists, f"{current}/{path} is missing"
        assert f.size == entry["size"], (
            f"{current}/{path}: expected {entry['size']} bytes (manifest), got {f.size}"
        )
    assert host.file(f"{current}/config.json").exists, f"{current}/config.json is missing"
    if not deep:
        print(f"report: {len(manifest['files'])} files, sizes checked (--deep hashes them)")
        return
    unhashed = sorted(p for p, entry in manifest["files"].items() if not entry.get("sha256"))
    assert not unhashed, f"the manifest holds no SHA-256 for {unhashed}: cannot check them"
    paths = sorted(manifest["files"])
    result = run_as_root(
        host, "cd %s && sha256sum -- " + " ".join(["%s"] * len(paths)), current, *paths
    )
    assert result.rc == 0, f"sha256sum in {current} failed: {result.stderr.strip()[:400]}"
    got = dict(reversed(line.split(None, 1)) for line in result.stdout.splitlines())
    wrong = {
        p: (manifest["files"][p]["sha256"], got.get(p))
        for p in paths
        if got.get(p) != manifest["files"][p]["sha256"]
    }
    assert not wrong, (
        f"{current}: expected each file's SHA-256 to match the manifest, got "
        + "; ".join(f"{p}: expected {want}, got {have}" for p, (want, have) in wrong.items())
    )
    print(f"report: {len(paths)} files, SHA-256 of every byte matches the manifest")

"""Converge phases: a fresh host next to its floors, a re-converge with nothing to do, and verify
on one host against three.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import bench_ansible as ba
from . import bench_host as bh
from .bench_context import (
    Context,
    ensure_deployed,
    hand_start,
    sandbox,
    start_vllm_if_stopped,
    unit_start,
)
from .bench_report import figure, ratio

#: How each floor is measured (shown beside the breakdown and written to the JSON).
FLOOR_METHODS = {
    "preflight": "the same reads over one new SSH connection (os-release, df, PCI vendors)",
    "docker_engine": "apt-get update + apt-get install of the same Docker package version",
    "image": "curl each layer from the same registry, unpack with tar (3 at a time)",
    "model": "apt-get install of the role's packages + venv/pip install of the SDK from its "
    "hashed lock (no cache) + curl of the model's files from the same mirror (4 at a time)",
    "service_start": "the unit's own `docker run` by hand (same image, flags, model), "
    "its compile cache emptied (as on a fresh host), to the first /health 200",
}


def _host_dicts(state: Any) -> list[dict[str, Any]]:
    return [asdict(h) for h in state.hosts]


# --- fresh converge --------------------------------------------------------------------------


def sdk_lock(setting: str) -> str:
    """The text of the model role's SDK lock: a name in the role's files/, or a path."""
    path = Path(setting)
    return (
        path if path.is_absolute() else ba.ROOT / "ansible/roles/model/files" / path
    ).read_text()


def floor_inputs(state: Any) -> dict[str, Any]:
    """What the floor script needs, read from the converged host, the roles and the inventory."""
    gv = ba.sandbox_group_vars()
    version = bh.must(
        bh.docker_exec(sandbox.HOST_CONTAINER, "dpkg-query", "-W", "-f", "${Version}", "docker.io"),
        "dpkg-query docker.io",
    ).strip()
    model_id = gv.get("servekit_model_id") or "Qwen/Qwen3-8B"
    revision = gv.get("servekit_model_revision") or "master"
    endpoint = str(gv.get("servekit_model_endpoint") or state.mirror["url"])
    listing = endpoint.replace(state.mirror["url"], state.mirror["local_url"])
    files = bh.list_model_files(listing, model_id, revision)
    registry, repo, digest = bh.split_image_ref(state.vllm_image)
    local_registry = "http://" + state.registry["local"]
    layer_urls = [
        (f"http://{registry}/v2/{repo}/blobs/{layer['digest']}", layer["decompress"])
        for layer in bh.fetch_layers(local_registry, repo, digest)
    ]
    ca = gv.get("model_ca_bundle") or ""
    mounts = [f"{ca}:/floor-ca.pem:ro"] if ca and Path(ca).is_file() else []
    return {
        "script": {
            "docker_packages": [f"docker.io={version}"],
            "model_packages": ba.role_setting("model", "_model_packages", "vars/Debian.yml"),
            "sdk_lock": sdk_lock(
                gv.get("model_sdk_lock") or ba.role_setting("model", "model_sdk_lock")
            ),
            "model_urls": bh.model_file_urls(endpoint, model_id, files, revision),
            "layer_urls": layer_urls,
            "ca_bundle": "/floor-ca.pem" if mounts else None,
            "pip_index_url": gv.get("model_pip_index_url") or None,
        },
        "mounts": mounts,
        "add_hosts": {state.control_hostname: state.gateway},
        "image": state.images["sandbox-host"],
    }


def preflight_floor(state: Any) -> float:
    """Seconds for the reads preflight makes, by hand over one new SSH connection."""
    from servekit.sandbox.hosts import ssh_command

    host = next(h for h in state.hosts if h.index == 1)
    ssh = ssh_command(host.ssh_port, Path(state.ssh_key), Path(state.known_hosts))
    start = time.monotonic()
    proc = subprocess.run(
        [*ssh, bh.PREFLIGHT_FLOOR], capture_output=True, text=True, check=False, timeout=60
    )
    seconds = time.monotonic() - start
    bh.must(proc, "preflight floor over ssh")
    return seconds


def breakdown(
    phases: dict[str, float], floors: dict[str, float], wall: float, total: float | None
) -> list[dict[str, Any]]:
    """Rows of the converge-vs-floor table: the five phases, then Ansible's own start-up."""
    rows = [
        {
            "phase": p,
            "seconds": phases.get(p),
            "floor_s": floors.get(p),
            "floor_method": FLOOR_METHODS[p],
        }
        for p in ba.PHASES
    ]
    if "other" in phases:
        rows.append({"phase": "other", "seconds": phases["other"], "floor_s": None})
    startup = wall - total if total is not None else None
    rows.append(
        {
            "phase": "ansible start-up",
            "seconds": round(startup, 3) if startup is not None else None,
            "floor_s": None,
            "floor_method": "process start, inventory and the recap (no floor)",
        }
    )
    rows.append(
        {
            "phase": "total",
            "seconds": round(wall, 3),
            "floor_s": round(sum(floors[p] for p in ba.PHASES), 3)
            if all(p in floors for p in ba.PHASES)
            else None,
            "floor_method": "sum of the floors",
        }
    )
    return rows


def fresh_converge(ctx: Context) -> dict[str, Any]:
    """A fresh sandbox host to a healthy endpoint with site.yml, per phase, next to its floors.

    Runs once by default (it replaces the sandbox host). The floors are measured after the
    converge, so whatever it warmed (page cache, the registry, a proxy) favours the floors and
    the ratios are, if anything, too high."""
    from servekit.sandbox import manager
    from servekit.sandbox.state import host_hostname

    ctx.say("removing the sandbox hosts (registry and mirror stay)")
    t = time.monotonic()
    manager.up(hosts=0, progress=ctx.progress)
    prepare_s = time.monotonic() - t
    ba.forget_facts([host_hostname(1)])
    t = time.monotonic()
    state = manager.up(hosts=1, progress=ctx.progress)
    create_s = time.monotonic() - t

    ctx.say("converging the fresh host with site.yml")
    run = ba.run_playbook(ctx.logs / "fresh-converge.log").check()
    profile = run.profile
    phases = ba.phase_seconds(profile)
    ctx.say(f"converged in {run.seconds:.0f} s ({run.changed()} changed); measuring the floors")

    floors: dict[str, float] = {}
    preflight = [preflight_floor(state) for _ in range(ctx.runs_for(3))]
    floors["preflight"] = statistics.median(preflight)
    steps: dict[str, float] = {}
    ctx.say("floors of packages, SDK, model files and image in a throw-away fresh-host container")
    try:
        inputs = floor_inputs(state)
        steps, failure = bh.run_floor_container(
            inputs["image"],
            bh.floor_script(**inputs["script"]),
            add_hosts=inputs["add_hosts"],
            mounts=inputs["mounts"],
        )
        if failure:
            ctx.error(failure)
    except Exception as exc:  # keep the converge figures; say which floors are missing
        ctx.error(f"floors in the throw-away container: {exc}")
    for p, parts in (
        ("docker_engine", ["docker_engine"]),
        ("image", ["image"]),
        ("model", ["model_packages", "model_sdk", "model_files"]),
    ):
        if all(k in steps for k in parts):
            floors[p] = round(sum(steps[k] for k in parts), 3)
    # The converge's own start compiled the model; so does the floor (its compile cache emptied).
    ctx.say("floor of the service start: vLLM started by hand, cache emptied (then the unit again)")
    try:
        floors["service_start"] = round(hand_start(ctx, empty_cache=True), 3)
    except Exception as exc:
        ctx.error(f"vLLM started by hand: {exc}")
    try:
        unit_start(ctx)  # back to the unit; also a sample of the cold_start phase
    except Exception as exc:
        ctx.error(f"systemctl start vllm after the hand start: {exc}")
    finally:
        start_vllm_if_stopped()

    figures: dict[str, Any] = {
        "converge_s": figure([run.seconds], "s", note="fresh host to healthy endpoint, 1 run"),
        "changed_tasks": figure([run.changed()], "count"),
    }
    for p in ba.PHASES:
        if p not in phases:
            continue
        figures[f"{p}_s"] = figure([phases[p]], "s")
        if p not in floors:
            continue
        samples = preflight if p == "preflight" else [floors[p]]
        figures[f"{p}_floor_s"] = floor = figure(samples, "s")
        if floor["min"] > 0:
            figures[f"{p}_vs_floor"] = ratio(figures[f"{p}_s"], floor, f"{p}_s / {p}_floor_s")
    if all(p in floors for p in ba.PHASES):
        figures["floors_sum_s"] = figure([sum(floors[p] for p in ba.PHASES)], "s")
        figures["converge_vs_floors"] = ratio(
            figures["converge_s"], figures["floors_sum_s"], "converge_s / floors_sum_s"
        )
    ctx.details["fresh_converge"] = {
        "breakdown": breakdown(phases, floors, run.seconds, profile.total_s),
        "floor_steps_s": steps,
        "slowest_tasks": ba.slowest(profile, 8),
        "sandbox_prepare_s": round(prepare_s, 3),
        "host_create_s": round(create_s, 3),
        "log": str(run.log),
    }
    return figures


# --- re-converge -----------------------------------------------------------------------------


def reconverge(ctx: Context) -> dict[str, Any]:
    """site.yml again on the healthy, converged host: wall time and changed tasks."""
    ensure_deployed(ctx)
    walls, changed, serving, slow, by_role = [], [], [], [], {}
    for i in range(ctx.runs_for(3)):
        run = ba.run_playbook(ctx.logs / f"reconverge-{i + 1}.log").check()
        walls.append(run.seconds)
        changed.append(run.changed())
        slow = ba.slowest(run.profile, 5)
        by_role = ba.role_seconds(run.profile)
        # The optional monitoring plays (Prometheus, exporters) ride along on the sandbox.
        serving.append(run.seconds - by_role.get("monitoring", 0.0))
        ctx.say(f"re-converge {i + 1}: {run.seconds:.1f} s, changed={changed[-1]}")
    ctx.details["reconverge"] = {
        "slowest_tasks_last_run": slow,
        "seconds_by_role_last_run": by_role,
        "ansible_cfg": ba.ansible_settings(),
    }
    return {
        "reconverge_s": figure(walls, "s", aim="< 15 s"),
        "reconverge_without_monitoring_s": figure(
            serving, "s", note="the same runs less the monitoring role's tasks"
        ),
        "changed_tasks": figure(changed, "count", aim="0"),
    }


# --- verify ----------------------------------------------------------------------------------


def _verify_once(inventory: Path, report_dir: Path, log: Path) -> tuple[float, bool]:
    from servekit.verify import run_verify

    report_dir.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh, contextlib.redirect_stdout(fh):
        start = time.monotonic()
        result = run_verify(inventory, report_dir)
        seconds = time.monotonic() - start
    return seconds, result.ok


def verify(ctx: Context) -> dict[str, Any]:
    """`make verify`'s run_verify on one host, then on three in parallel, alternating.

    Costs a converge of two more fresh sandbox hosts (in parallel, reported as a figure of
    its own); they are removed at the end."""
    from servekit.sandbox import manager
    from servekit.sandbox.state import host_hostname

    ensure_deployed(ctx)
    manager.up(hosts=1, progress=ctx.progress)  # hosts 2 and 3 must be fresh
    extra = [host_hostname(n) for n in (2, 3)]
    ba.forget_facts(extra)
    inv_dir = Path(tempfile.mkdtemp(prefix="servekit-bench-inventory-"))
    try:
        ctx.say("two more sandbox hosts, converged in parallel")
        state = manager.up(hosts=3, progress=ctx.progress)
        inventory3 = ba.write_inventory(inv_dir, _host_dicts(state))
        run = ba.run_playbook(
            ctx.logs / "verify-converge-2-hosts.log", inventory3, extra=["--limit", ",".join(extra)]
        ).check()
        figures: dict[str, Any] = {
            "converge_2_fresh_hosts_parallel_s": figure(
                [run.seconds], "s", note="the sandbox hosts share this machine's CPUs"
            )
        }
        one, three, failed = [], [], []
        for i in range(ctx.runs_for(3)):
            for label, inventory, out in (
                ("1 host", ba.SANDBOX_INVENTORY, one),
                ("3 hosts", inventory3, three),
            ):
                tag = label.replace(" ", "-")
                seconds, ok = _verify_once(
                    inventory, ctx.logs / f"verify-{tag}", ctx.logs / f"verify-{tag}.log"
                )
                out.append(seconds)
                if not ok:
                    failed.append(f"{label} run {i + 1}")
                ctx.say(
                    f"verify {label} (run {i + 1}): {seconds:.1f} s, {'ok' if ok else 'FAILED'}"
                )
        if failed:
            raise RuntimeError(f"verify failed ({', '.join(failed)}); logs in {ctx.logs}/verify-*")
        figures["verify_1_host_s"] = figure(one, "s")
        figures["verify_3_hosts_s"] = figure(three, "s")
        figures["verify_3_vs_1"] = ratio(
            figures["verify_3_hosts_s"],
            figures["verify_1_host_s"],
            "verify_3_hosts_s / verify_1_host_s",
        )
        single = ctx.figure_of("fresh_converge", "converge_s")
        if single:
            figures["converge_2_parallel_vs_1"] = ratio(
                figures["converge_2_fresh_hosts_parallel_s"],
                single,
                "converge_2_fresh_hosts_parallel_s / fresh_converge.converge_s",
            )
        return figures
    finally:
        ctx.say("removing sandbox hosts 2 and 3")
        manager.up(hosts=1, progress=ctx.progress)
        shutil.rmtree(inv_dir, ignore_errors=True)

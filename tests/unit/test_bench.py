"""The pure parts of `make bench` (benchmarks/bench*.py): reading Ansible's output, statistics,
the table and the JSON, the floors' script, vLLM started by hand, and the serving client.

Nothing here touches the sandbox; the shell functions and the streaming client run against
small servers on loopback.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import bench, bench_converge, bench_runtime
from benchmarks import bench_ansible as ba
from benchmarks import bench_host as bh
from benchmarks import bench_report as br
from benchmarks import bench_serving as bs

ROOT = Path(__file__).resolve().parents[2]

# A fresh converge as profile_tasks prints it (recorded on the sandbox, tasks left out between
# the ones kept; the times are the recorded ones, so the tasks kept absorb the gaps).
CONVERGE = """
PLAY [Preflight | Check hosts and inputs before any change] ********************

TASK [Gathering Facts] *********************************************************
Wednesday 25 November 2026  04:22:44 +0000 (0:00:00.007)       0:00:00.007 ****
ok: [sandbox-1]

TASK [Preflight | Check the host (OS, disk, accelerator)] **********************
Wednesday 25 November 2026  04:22:45 +0000 (0:00:00.906)       0:00:00.914 ****
included: preflight for sandbox-1

TASK [Preflight | Check each role's inputs] ************************************
Wednesday 25 November 2026  04:22:46 +0000 (0:00:00.034)       0:00:01.807 ****
included: nvidia_driver for sandbox-1 => (item=nvidia_driver)
included: docker_engine for sandbox-1 => (item=docker_engine)

TASK [vllm_service : VLLM | Refuse to publish an unauthenticated API beyond loopback] ***
Wednesday 25 November 2026  04:22:46 +0000 (0:00:00.102)       0:00:02.300 ****
skipping: [sandbox-1]

PLAY [Host stack | NVIDIA driver, Docker engine, NVIDIA Container Toolkit] *****

TASK [nvidia_driver : Validating arguments against arg spec 'main' - Installs and checks a pinned NVIDIA driver, with Fabric Manager where needed.] ***
Wednesday 25 November 2026  04:22:47 +0000 (0:00:00.058)       0:00:02.488 ****
ok: [sandbox-1]

TASK [docker_engine : Docker engine | Install the pinned packages (apt)] *******
Wednesday 25 November 2026  04:22:47 +0000 (0:00:00.313)       0:00:03.020 ****
changed: [sandbox-1]

RUNNING HANDLER [docker_engine : Restart docker] *******************************
Wednesday 25 November 2026  04:23:01 +0000 (0:00:00.001)       0:00:16.496 ****
changed: [sandbox-1]

PLAY [Serve | Model and vLLM server] *******************************************

TASK [model : Validating arguments against arg spec 'main' - Downloads and publishes the model.] ***
Wednesday 25 November 2026  04:23:02 +0000 (0:00:00.018)       0:00:17.615 ****
ok: [sandbox-1]

TASK [model : Model | Download, verify and publish the model] ******************
Wednesday 25 November 2026  04:23:13 +0000 (0:00:00.189)       0:00:28.329 ****
changed: [sandbox-1]

TASK [vllm_service : VLLM | Check whether the pinned image is present] *********
Wednesday 25 November 2026  04:23:14 +0000 (0:00:00.190)       0:00:29.500 ****
ok: [sandbox-1]

TASK [vllm_service : VLLM | Pull the pinned image] *****************************
Wednesday 25 November 2026  04:23:14 +0000 (0:00:00.228)       0:00:29.742 ****
changed: [sandbox-1]

RUNNING HANDLER [vllm_service : Restart vllm] **********************************
Wednesday 25 November 2026  04:23:49 +0000 (0:00:00.191)       0:01:04.374 ****
changed: [sandbox-1]

RUNNING HANDLER [vllm_service : Wait until vllm is healthy] ********************
Wednesday 25 November 2026  04:24:36 +0000 (0:00:46.816)       0:01:51.191 ****
ok: [sandbox-1]

TASK [vllm_service : VLLM | Check that the API answers] ************************
Wednesday 25 November 2026  04:24:37 +0000 (0:00:00.374)       0:01:52.475 ****
ok: [sandbox-1]

PLAY RECAP *********************************************************************
sandbox-1                  : ok=74   changed=18   unreachable=0    failed=0    skipped=5    rescued=0    ignored=0


TASKS RECAP ********************************************************************
Wednesday 25 November 2026  04:24:37 +0000 (0:00:00.282)       0:01:52.758 ****
===============================================================================
vllm_service : Restart vllm -------------------------------------------- 46.82s
vllm_service : VLLM | Pull the pinned image ---------------------------- 31.62s
"""  # noqa: E501 (recorded output)

RECAP_3_HOSTS = """
PLAY RECAP *********************************************************************
sandbox-1                  : ok=68   changed=0    unreachable=0    failed=0    skipped=6    rescued=0    ignored=0
sandbox-2                  : ok=74   changed=18   unreachable=0    failed=0    skipped=5    rescued=0    ignored=0
sandbox-3                  : ok=3    changed=0    unreachable=1    failed=0    skipped=0    rescued=0    ignored=0

TASKS RECAP ********************************************************************
"""  # noqa: E501 (recorded output)

# vllm.service as the role renders it for the sandbox (`systemctl cat` adds the first line).
UNIT = """# /etc/systemd/system/vllm.service
#
# Ansible managed
#
[Unit]
Description=vLLM OpenAI-compatible server (Qwen3-8B)
After=docker.service network-online.target

[Service]
Type=simple
ExecStartPre=-/usr/bin/docker rm --force vllm
ExecStart=/usr/bin/docker run --rm --name vllm \\
  --env-file /etc/vllm/vllm.env \\
  --security-opt no-new-privileges \\
  --ipc=host \\
  --publish 0.0.0.0:8000:8000 \\
  --volume /opt/models/Qwen/Qwen3-8B/master:/models/Qwen3-8B:ro \\
  --env VLLM_CACHE_ROOT=/var/cache/vllm \\
  --volume /var/cache/vllm-host:/var/cache/vllm \\
  servekit-control:5000/servekit/vllm-cpu:v0.32.0@sha256:0123abcd \\
  /models/Qwen3-8B \\
  --served-model-name Qwen3-8B \\
  --max-model-len 8192 \\
  --reasoning-parser qwen3 \\
  --host 0.0.0.0 --port 8000
# The unit is "started" only once /health answers.
ExecStartPost=/usr/local/libexec/servekit/vllm-wait-ready $MAINPID
ExecStop=/usr/bin/docker stop --time 45 vllm
Restart=always
"""


# --- profile_tasks and the recap -------------------------------------------------------------


def test_profile_tasks_output_gives_each_task_its_duration():
    profile = ba.parse_profile(CONVERGE)
    assert profile.total_s == pytest.approx(112.758)
    assert len(profile.tasks) == 14
    first, pull, restart = profile.tasks[0], profile.tasks[10], profile.tasks[11]
    assert (first.name, first.start_s, first.seconds) == ("Gathering Facts", 0.007, 0.907)
    assert pull.name == "vllm_service : VLLM | Pull the pinned image"
    assert pull.seconds == pytest.approx(64.374 - 29.742)
    assert restart.handler and restart.role == "vllm_service"
    assert restart.seconds == pytest.approx(111.191 - 64.374)
    assert profile.tasks[-1].seconds == pytest.approx(112.758 - 112.475)
    # Every second from the first task's start to the recap belongs to exactly one task.
    assert sum(t.seconds for t in profile.tasks) == pytest.approx(112.758 - 0.007, abs=0.01)


def test_role_seconds_add_up_and_keep_tasks_outside_roles_under_their_play():
    profile = ba.parse_profile(CONVERGE)
    by_role = ba.role_seconds(profile)
    assert by_role["vllm_service"] == pytest.approx(
        sum(t.seconds for t in profile.tasks if t.role == "vllm_service")
    )
    assert any(key.startswith("play: ") for key in by_role)
    assert sum(by_role.values()) == pytest.approx(112.758 - 0.007, abs=0.01)


def test_tasks_map_to_the_converge_phases():
    profile = ba.parse_profile(CONVERGE)
    phases = {t.name: ba.phase_of(t.play, t.name) for t in profile.tasks}
    assert phases["Gathering Facts"] == "preflight"
    # Each role's input checks run in the preflight play: preflight, not the role's phase.
    assert (
        phases["vllm_service : VLLM | Refuse to publish an unauthenticated API beyond loopback"]
        == "preflight"
    )
    assert phases["docker_engine : Docker engine | Install the pinned packages (apt)"] == (
        "docker_engine"
    )
    assert phases["docker_engine : Restart docker"] == "docker_engine"
    assert phases[next(n for n in phases if n.startswith("nvidia_driver"))] == "docker_engine"
    assert phases["model : Model | Download, verify and publish the model"] == "model"
    assert phases["vllm_service : VLLM | Check whether the pinned image is present"] == "image"
    assert phases["vllm_service : VLLM | Pull the pinned image"] == "image"
    assert phases["vllm_service : Restart vllm"] == "service_start"
    assert phases["vllm_service : Wait until vllm is healthy"] == "service_start"


def test_phase_seconds_add_up_to_the_playbook_time():
    profile = ba.parse_profile(CONVERGE)
    seconds = ba.phase_seconds(profile)
    assert list(seconds) == list(ba.PHASES)
    assert seconds["image"] == pytest.approx(64.374 - 29.5)
    assert seconds["service_start"] == pytest.approx(112.758 - 64.374)
    assert sum(seconds.values()) == pytest.approx(112.751, abs=0.01)
    assert ba.slowest(profile, 2)[0] == {
        "task": "vllm_service : Restart vllm",
        "seconds": pytest.approx(46.817),
    }


@pytest.mark.parametrize(
    ("play", "task", "phase"),
    [
        ("Preflight | Check hosts", "preflight : Preflight | Detect NVIDIA GPUs", "preflight"),
        ("Preflight | Check hosts", "model : Model | Check the model settings", "preflight"),
        ("Host stack | NVIDIA driver", "Gathering Facts", "docker_engine"),
        ("Host stack | x", "nvidia_container_toolkit : Skip on a CPU host", "docker_engine"),
        ("Serve | Model and vLLM server", "Gathering Facts", "model"),
        (
            "Serve | Model and vLLM server",
            "vllm_service : VLLM | Install the units",
            "service_start",
        ),
        (
            "Serve | Restart the servers a batch at a time",
            "Serve | Say which hosts restart in this batch",
            "service_start",
        ),
        ("Something else", "debug", "other"),
    ],
)
def test_phase_of(play, task, phase):
    assert ba.phase_of(play, task) == phase


def test_output_cut_short_leaves_the_last_task_open():
    cut = CONVERGE.split("TASKS RECAP")[0]
    profile = ba.parse_profile(cut)
    assert profile.total_s is None
    assert profile.tasks[-1].seconds is None
    assert profile.tasks[-2].seconds == pytest.approx(112.475 - 111.191)


def test_colours_and_warnings_do_not_confuse_the_parser():
    coloured = CONVERGE.replace(
        "TASK [Gathering Facts] ***", "\x1b[0;32mTASK [Gathering Facts] ***"
    ).replace(
        "TASK [model : Model | Download",
        "[WARNING]: something\nTASK [model : Model | Download",
    )
    assert [t.seconds for t in ba.parse_profile(coloured).tasks] == [
        t.seconds for t in ba.parse_profile(CONVERGE).tasks
    ]


def test_play_recap_counts_per_host():
    assert ba.parse_recap(CONVERGE) == {
        "sandbox-1": {
            "ok": 74,
            "changed": 18,
            "unreachable": 0,
            "failed": 0,
            "skipped": 5,
            "rescued": 0,
            "ignored": 0,
        }
    }
    hosts = ba.parse_recap(RECAP_3_HOSTS)
    assert list(hosts) == ["sandbox-1", "sandbox-2", "sandbox-3"]
    assert [h["changed"] for h in hosts.values()] == [0, 18, 0]
    assert hosts["sandbox-3"]["unreachable"] == 1
    assert ba.parse_recap("PLAY [x] ***\nfatal: [sandbox-1]: UNREACHABLE!") == {}


def test_playbook_run_sums_changed_and_fails_loudly(tmp_path):
    run = ba.PlaybookRun(0, 10.0, RECAP_3_HOSTS, tmp_path / "x.log")
    assert run.changed() == 18
    assert run.check() is run
    with pytest.raises(RuntimeError, match="exit 2"):
        ba.PlaybookRun(2, 1.0, "boom", tmp_path / "x.log").check()


# --- ansible.cfg and inventories -------------------------------------------------------------


def test_ansible_cfg_has_the_settings_that_make_a_reconverge_fast():
    settings = ba.ansible_settings()
    assert settings["pipelining"].lower() == "true"
    assert settings["gathering"] == "smart"
    assert settings["fact_caching"] == "jsonfile"
    assert "ControlPersist" in settings["ssh_args"]
    assert "profile_tasks" in ba.callbacks_with_profile(settings["callbacks_enabled"])


def test_profile_tasks_is_added_to_the_configured_callbacks():
    assert ba.callbacks_with_profile(None) == "profile_tasks"
    assert ba.callbacks_with_profile("timer, foo") == "timer,foo,profile_tasks"
    assert ba.callbacks_with_profile("ansible.posix.profile_tasks") == (
        "ansible.posix.profile_tasks"
    )


def test_fact_cache_of_recreated_hosts_is_forgotten(tmp_path):
    cfg = tmp_path / "ansible.cfg"
    cfg.write_text("[defaults]\nfact_caching_connection = .facts\n")
    cache = tmp_path / ".facts"
    cache.mkdir()
    # ansible-core 2.19 prefixes the key with its cache schema; earlier releases did not.
    for name in ("s1_sandbox-1", "sandbox-1", "s1_sandbox-10", "s1_sandbox-2", "xsandbox-1"):
        (cache / name).write_text("{}")
    assert ba.fact_cache_dir(cfg) == cache
    removed = ba.forget_facts(["sandbox-1", "sandbox-3"], cfg)
    assert sorted(p.name for p in removed) == ["s1_sandbox-1", "sandbox-1"]
    assert sorted(p.name for p in cache.iterdir()) == [
        "s1_sandbox-10",
        "s1_sandbox-2",
        "xsandbox-1",
    ]
    assert ba.forget_facts(["sandbox-1"], tmp_path / "elsewhere" / "ansible.cfg") == []


def test_inventory_of_several_sandbox_hosts(tmp_path):
    hosts = [
        {
            "hostname": f"sandbox-{n}",
            "ssh_host": "127.0.0.1",
            "ssh_port": 2221 + n,
            "api_port": 7999 + n,
        }
        for n in (1, 2, 3)
    ]
    path = ba.write_inventory(tmp_path / "inv", hosts)
    data = ba.load_yaml(path)
    entries = data["all"]["children"]["gpu_hosts"]["hosts"]
    assert entries["sandbox-3"] == {
        "ansible_host": "127.0.0.1",
        "ansible_port": 2224,
        "servekit_probe_url": "http://127.0.0.1:8002",
    }
    assert (tmp_path / "inv" / "group_vars" / "gpu_hosts.yml").is_file()


def test_health_window_follows_the_role_defaults():
    # interval 7 s x (3 failures + 1) + 3 timeouts of 4 s: a deadline with a margin
    assert bench_runtime.health_window() == 40


# --- statistics, table, JSON -----------------------------------------------------------------


def test_figure_has_min_median_max_and_the_runs():
    fig = br.figure([3.0, 1.0, 2.0, 10.0], "s", aim="< 15 s")
    assert fig == {
        "min": 1.0,
        "median": 2.5,
        "max": 10.0,
        "runs": [3.0, 1.0, 2.0, 10.0],
        "n": 4,
        "unit": "s",
        "aim": "< 15 s",
    }
    assert br.figure([7], "count")["median"] == 7.0
    with pytest.raises(ValueError):
        br.figure([], "s")


def test_ratio_of_medians_with_the_widest_bounds():
    a = br.figure([10.0, 12.0, 20.0], "s")
    b = br.figure([4.0, 5.0, 6.0], "s")
    r = br.ratio(a, b, "a / b")
    assert r["median"] == pytest.approx(12.0 / 5.0, abs=1e-4)
    assert r["min"] == pytest.approx(10.0 / 6.0, abs=1e-4)
    assert r["max"] == pytest.approx(20.0 / 4.0, abs=1e-4)
    assert (r["unit"], r["n"], r["derived"]) == ("x", 3, "a / b")
    with pytest.raises(ValueError):
        br.ratio(a, br.figure([0.0], "s"), "a / 0")


def test_table_lists_every_figure_and_failed_phases():
    phases = {
        "reconverge": {
            "figures": {
                "reconverge_s": br.figure([12.6, 13.1, 12.9], "s", aim="< 15 s"),
                "changed_tasks": br.figure([0, 0, 0], "count", aim="0"),
            }
        },
        "verify": {"figures": {}, "error": "RuntimeError: verify failed (3 hosts run 1)"},
    }
    table = br.render_table(phases)
    lines = table.splitlines()
    assert lines[0].split() == ["phase", "figure", "median", "min", "max", "n", "unit", "aim"]
    assert lines[2].split() == [
        "reconverge",
        "reconverge_s",
        "12.9",
        "12.6",
        "13.1",
        "3",
        "s",
        "<",
        "15",
        "s",
    ]
    assert lines[3].split() == ["changed_tasks", "0", "0", "0", "3", "count", "0"]
    assert lines[4].startswith("verify") and "FAILED: RuntimeError: verify failed" in lines[4]
    # Numbers are right-aligned under their header.
    end = lines[0].index("median") + len("median")
    assert lines[2][:end].endswith(" 12.9") and lines[3][:end].endswith(" 0")


def test_values_are_shown_with_sensible_precision():
    assert br.fmt_value(1234.5) == "1234"
    assert br.fmt_value(43.21) == "43.2"
    assert br.fmt_value(2.345) == "2.35"
    assert br.fmt_value(0.0234) == "0.023"
    assert br.fmt_value(0.0) == "0.00"
    assert br.fmt_value(3.0, "count") == "3"
    assert br.fmt_value(None) == "-"


def test_breakdown_of_the_fresh_converge():
    profile = ba.parse_profile(CONVERGE)
    phases = ba.phase_seconds(profile)
    floors = {"preflight": 0.3, "docker_engine": 9.0, "image": 20.0, "model": 7.5}
    floors["service_start"] = 45.0
    rows = bench_converge.breakdown(phases, floors, 115.0, profile.total_s)
    assert [r["phase"] for r in rows] == [*ba.PHASES, "ansible start-up", "total"]
    assert rows[-2]["seconds"] == pytest.approx(115.0 - 112.758)
    assert rows[-1]["floor_s"] == pytest.approx(81.8)
    text = br.render_breakdown(rows)
    assert text.splitlines()[0].split()[:3] == ["phase", "converge", "s"]
    image = next(line for line in text.splitlines() if line.startswith("image"))
    assert "34.9" in image and "20.0" in image and "1.7x" in image

    del floors["service_start"]  # not measured: no ratio, no total
    rows = bench_converge.breakdown(phases, floors, 115.0, profile.total_s)
    assert rows[-1]["floor_s"] is None
    text = br.render_breakdown(rows)
    service = next(line for line in text.splitlines() if line.startswith("service_start"))
    assert service.split()[1:4] == ["48.4", "-", "-"]


def test_report_json_shape(monkeypatch):
    monkeypatch.setattr(br, "_run", lambda cmd, timeout=20: None)
    phases = {
        "reconverge": {"figures": {"reconverge_s": br.figure([12.0], "s")}, "seconds": 40.0},
        "verify": {"figures": {}, "error": "boom", "seconds": 3.0},
    }
    doc = br.report(phases, br.machine("0.11.0", "http://localhost:8000"), {"runs": {}})
    assert json.loads(json.dumps(doc)) == doc
    assert doc["schema"] == br.SCHEMA and doc["complete"] is True
    assert doc["failed"] == ["verify"]
    machine = doc["machine"]
    for key in ("nproc", "memory_bytes", "cpu_model", "kernel", "docker_server", "vllm_version"):
        assert key in machine
    assert machine["vllm_version"] == "0.11.0" and machine["nproc"] >= 1
    fig = doc["phases"]["reconverge"]["figures"]["reconverge_s"]
    assert {"min", "median", "max", "runs", "n", "unit"} <= set(fig)


def test_machine_description_parsers():
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
    assert br.cpu_model(cpuinfo) == "AMD EPYC 9654 96-Core Processor"
    assert br.mem_total_bytes("MemTotal:       24683660 kB\nMemFree: 1 kB\n") == 24683660 * 1024
    assert br.os_name('NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n') == (
        "Debian GNU/Linux 12 (bookworm)"
    )


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "reports" / "bench.json"
    br.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]


# --- the orchestrator ------------------------------------------------------------------------


def test_phase_selection_keeps_the_order_and_rejects_unknown_names():
    assert [p.name for p in bench.select("model,fresh_converge", None)] == [
        "fresh_converge",
        "model",
    ]
    assert "verify" not in [p.name for p in bench.select(None, "verify")]
    with pytest.raises(SystemExit, match="unknown phase"):
        bench.select("fresh", None)


def test_default_runs_and_plan(tmp_path):
    ctx = bench.Context(logs=tmp_path)
    assert ctx.runs_for(1) == 1 and ctx.runs_for(3) == 3
    assert bench.Context(logs=tmp_path, runs=5).runs_for(1) == 5
    assert bench.Context(logs=tmp_path, runs=5, quick=True).runs_for(3) == 1
    text = bench.plan(list(bench.PHASES), ctx)
    assert "fresh_converge     1" in text and "1 run: it is expensive" in text
    total = float(text.splitlines()[-1].split()[1])
    assert total < 30, "the default plan must fit `make bench` into 30 minutes"


def test_model_supply_report_becomes_figures():
    def stats(*runs):
        return {
            "min": min(runs),
            "median": sorted(runs)[len(runs) // 2],
            "max": max(runs),
            "runs": list(runs),
        }

    report = {
        "throughput": {
            "file_bytes": 1_000_000_000,
            "raw_loopback": {"seconds": stats(1.0, 1.25, 1.1)},
            "mirror_curl": {"seconds": stats(1.25, 1.3, 1.2)},
            "mirror_sdk": {"seconds": stats(4.0, 4.0, 4.0)},
            "mirror_sdk_4_clients": {"seconds": stats(20.0, 20.0, 20.0)},
        },
        "rerun": [
            {
                "label": "10 MiB",
                "module_quick": stats(0.2, 0.2, 0.2),
                "module_deep": stats(0.3, 0.3, 0.3),
                "sdk_rehash": stats(0.5, 0.6, 0.6),
            },
            {
                "label": "4 GiB",
                "module_quick": stats(0.2, 0.21, 0.2),
                "module_deep": stats(7.5, 7.6, 7.4),
                "sdk_rehash": stats(9.0, 9.2, 9.1),
            },
        ],
    }
    figures = bench_runtime.model_figures(report)
    assert figures["raw_loopback_mb_per_s"]["median"] == pytest.approx(1000 / 1.1)
    assert figures["mirror_sdk_4_clients_mb_per_s"]["median"] == pytest.approx(200.0)
    assert figures["mirror_sdk_vs_raw"]["median"] == pytest.approx(250 / (1000 / 1.1))
    assert figures["rerun_4GiB_module_quick_s"]["runs"] == [0.2, 0.21, 0.2]
    assert figures["rerun_quick_4GiB_vs_10MiB"]["median"] == pytest.approx(1.0)
    assert figures["rerun_4GiB_sdk_rehash_vs_quick"]["median"] == pytest.approx(9.1 / 0.2)


# --- vLLM by hand ----------------------------------------------------------------------------


def test_unit_exec_start_becomes_a_detached_run_under_another_name():
    argv = bh.exec_start_argv(UNIT)
    assert argv[:5] == ["/usr/bin/docker", "run", "--rm", "--name", "vllm"]
    assert argv[-4:] == ["--host", "0.0.0.0", "--port", "8000"]
    hand = bh.hand_start_argv(argv)
    assert hand[:6] == ["/usr/bin/docker", "run", "--detach", "--rm", "--name", bh.HAND_CONTAINER]
    # Everything else (image, flags, model, port) is the unit's own.
    assert [a for a in hand if a not in ("--detach", bh.HAND_CONTAINER)] == [
        a for a in argv if a != "vllm"
    ]
    with pytest.raises(ValueError):
        bh.hand_start_argv(["/usr/bin/podman", "run", "x"])


def test_a_drop_in_exec_start_wins():
    drop_in = UNIT + "\n# /etc/systemd/system/vllm.service.d/x.conf\n[Service]\nExecStart=\n"
    drop_in += "ExecStart=/usr/bin/docker run --name vllm img --port 9000\n"
    assert bh.exec_start_argv(drop_in) == [
        "/usr/bin/docker",
        "run",
        "--name",
        "vllm",
        "img",
        "--port",
        "9000",
    ]
    with pytest.raises(ValueError):
        bh.exec_start_argv("[Service]\nType=simple\n")


# --- floors ----------------------------------------------------------------------------------


def test_image_reference_and_layers():
    ref = "servekit-control:5000/servekit/vllm-cpu@sha256:abc"
    assert bh.split_image_ref(ref) == ("servekit-control:5000", "servekit/vllm-cpu", "sha256:abc")
    assert bh.split_image_ref("reg:5000/a/b:v1@sha256:d") == ("reg:5000", "a/b", "sha256:d")
    with pytest.raises(ValueError):
        bh.split_image_ref("vllm/vllm-openai:v0.13.0")
    manifest = {
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": "sha256:1",
                "size": 10,
            },
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": "sha256:2"},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:3"},
        ]
    }
    assert [(la["digest"], la["decompress"]) for la in bh.layers(manifest)] == [
        ("sha256:1", "gzip -dc"),
        ("sha256:2", "zstd -dc"),
        ("sha256:3", "cat"),
    ]
    with pytest.raises(ValueError):
        bh.layers({"layers": [{"mediaType": "application/x-foo", "digest": "sha256:9"}]})
    index = {
        "manifests": [
            {"digest": "sha256:arm", "platform": {"architecture": "arm64"}},
            {"digest": "sha256:amd", "platform": {"architecture": "amd64"}},
        ]
    }
    assert bh.pick_platform(index) == "sha256:amd"
    with pytest.raises(ValueError):
        bh.layers(index)


def test_model_file_urls_are_quoted():
    urls = bh.model_file_urls("http://m:8090", "Qwen/Qwen3-8B", ["a b/c.json"], "master")
    assert urls == [
        "http://m:8090/api/v1/models/Qwen/Qwen3-8B/repo?Revision=master&FilePath=a+b%2Fc.json"
    ]


def floor_script() -> str:
    return bh.floor_script(
        docker_packages=["docker.io=20.10.24+dfsg1-1+deb12u1+b6"],
        model_packages=["python3-venv", "python3-packaging"],
        sdk_lock="modelscope==1.40.2 \\\n    --hash=sha256:ab\n",
        model_urls=[
            "http://servekit-control:8090/api/v1/models/Q/M/repo?Revision=master&FilePath=x"
        ],
        layer_urls=[("http://servekit-control:5000/v2/r/blobs/sha256:1", "gzip -dc")],
        ca_bundle="/floor-ca.pem",
    )


def test_floor_script_does_the_converge_work_by_hand():
    script = floor_script()
    assert "apt-get -q install -y docker.io=20.10.24+dfsg1-1+deb12u1+b6" in script
    assert "apt-get -q install -y python3-venv python3-packaging" in script
    assert (
        "printf %s 'modelscope==1.40.2 \\\n    --hash=sha256:ab\n' > \"$FLOOR/sdk.lock.txt\""
        in script
    )
    pip = "install -q --no-cache-dir --require-hashes --only-binary=:all: -r"
    assert f'pip" {pip} "$FLOOR/sdk.lock.txt"' in script
    assert "PIP_CERT=/floor-ca.pem" in script
    assert f"| parallel {bh.PULL_CONCURRENCY} unpack_layer" in script
    marks = [ln.split()[1] for ln in script.splitlines() if ln.startswith("mark ")]
    assert marks == ["docker_engine", "model_packages", "model_sdk", "model_files", "image"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_floor_lines_are_parsed():
    out = "Hit:1 http://deb.debian.org\nFLOOR docker_engine 12.345\nFLOOR image 20.5\nFLOOR x y\n"
    assert bh.parse_floors(out) == {"docker_engine": 12.345, "image": 20.5}


@pytest.fixture
def file_server(tmp_path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


@pytest.mark.skipif(not shutil.which("curl"), reason="the floor script uses curl")
def test_floor_shell_functions_fetch_and_unpack_in_parallel(file_server, tmp_path):
    url, root = file_server
    for i in range(4):
        (root / f"layer{i}").write_bytes(_tar_gz({f"dir{i}/file": f"layer {i}".encode()}))
    (root / "config.json").write_text("{}")
    floor = tmp_path / "floor"
    layer_lines = " ".join(f"'{url}/layer{i} gzip -dc'" for i in range(4))
    script = bh.SCRIPT_FUNCTIONS + "\n".join(
        [
            "t=$(now)",
            f"printf '%s\\n' {layer_lines} | parallel 3 unpack_layer",
            f"printf '%s\\n' '{url}/config.json' | parallel 4 fetch_file",
            "mark image $t",
        ]
    )
    proc = subprocess.run(
        ["bash", "-c", script],
        env={"FLOOR": str(floor), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    unpacked = sorted(p.read_text() for p in (floor / "image").glob("*/dir*/file"))
    assert unpacked == [f"layer {i}" for i in range(4)]
    assert [p.read_text() for p in (floor / "model").iterdir()] == ["{}"]
    assert 0 <= bh.parse_floors(proc.stdout)["image"] < 30

    missing = (
        bh.SCRIPT_FUNCTIONS + f"printf '%s\\n' '{url}/nope gzip -dc' | parallel 3 unpack_layer"
    )
    proc = subprocess.run(
        ["bash", "-c", missing],
        env={"FLOOR": str(floor), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0, "a layer that cannot be fetched fails the floor"


# --- serving client --------------------------------------------------------------------------


def test_stream_metrics_from_events():
    def chunk(**delta):
        return json.dumps({"choices": [{"index": 0, "delta": delta}]})

    events = [
        (10.1, chunk(role="assistant", content="")),
        (10.3, chunk(reasoning="Okay")),
        (10.4, chunk(reasoning=" so")),
        (10.7, chunk(content="Hi")),
        (10.8, json.dumps({"choices": [], "usage": {"completion_tokens": 4}})),
        (10.8, "[DONE]"),
    ]
    stream = bs.measure(events, sent_at=10.0, end_at=11.0)
    assert stream.ttft == pytest.approx(0.3)
    assert stream.last == pytest.approx(0.7)
    assert stream.tokens == 4
    assert stream.decode_tokens_per_s == pytest.approx(3 / 0.4)
    assert stream.tokens_per_s == pytest.approx(4.0)
    with pytest.raises(RuntimeError, match="usage"):
        bs.measure(events[:4], 10.0, 11.0)
    with pytest.raises(RuntimeError, match="no generated text"):
        bs.measure(events[:1], 10.0, 11.0)
    assert bs.Stream(0.1, 0.1, 0.2, 1).decode_tokens_per_s is None
    # 64 tokens in two reads: the gap between reads is no decode rate.
    assert bs.Stream(0.1, 0.1001, 0.2, 64, arrivals=2).decode_tokens_per_s is None
    assert bs.Stream(0.1, 0.7, 0.8, 64, arrivals=40).decode_tokens_per_s == pytest.approx(105)


def test_chunks_parsed_from_one_read_count_as_one_arrival():
    text = json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}}]})
    usage = json.dumps({"choices": [], "usage": {"completion_tokens": 64}})
    # 64 chunks stamped 3 microseconds apart (one read, as parsed): no decode rate.
    burst = [(10.1 + i * 3e-6, text) for i in range(64)]
    stream = bs.measure([*burst, (10.2, usage)], sent_at=10.0, end_at=10.3)
    assert stream.arrivals == 1
    assert stream.decode_tokens_per_s is None
    # The same chunks 10 ms apart arrived token by token.
    steady = [(10.1 + i * 0.01, text) for i in range(64)]
    stream = bs.measure([*steady, (10.8, usage)], sent_at=10.0, end_at=10.9)
    assert stream.arrivals == 64
    assert stream.decode_tokens_per_s == pytest.approx(63 / 0.63)
    body = bs.request_body("Qwen3-8B", 64)
    assert body["ignore_eos"] and body["stream_options"] == {"include_usage": True}


class _FakeVLLM(http.server.BaseHTTPRequestHandler):
    """Streams like vLLM (uvicorn): chunked transfer encoding, one SSE event per token."""

    protocol_version = "HTTP/1.1"
    gap_s = 0.002  # between tokens

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"version": "0.0-test"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = request["max_tokens"]
        for i in range(n):
            delta = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
            self._chunk(f"data: {json.dumps(delta)}\n\n".encode())
            time.sleep(self.gap_s)
        usage = {"choices": [], "usage": {"completion_tokens": n}}
        self._chunk(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # 16 clients connect at once
    daemon_threads = True


def test_streaming_client_against_a_fake_server():
    server = _Server(("127.0.0.1", 0), _FakeVLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        one = bs.stream_once(url, "m", 20)
        assert one.tokens == 20 and 0 < one.ttft <= one.last <= one.total
        # Tokens are timed as they arrive, not when the response ends: 2 ms apart.
        assert one.last - one.ttft >= 19 * _FakeVLLM.gap_s * 0.9
        assert one.decode_tokens_per_s < 1 / (_FakeVLLM.gap_s * 0.9)
        streams, wall = bs.concurrent(url, "m", 4, 16)
        assert len(streams) == 16 and all(s.tokens == 4 for s in streams)
        assert bs.aggregate_tokens_per_s(streams, wall) == pytest.approx(64 / wall)
        assert bs.server_version(url) == "0.0-test"
        assert bs.server_version("http://127.0.0.1:9") is None
    finally:
        server.shutdown()
        server.server_close()


# --- phase wiring, with the sandbox faked ----------------------------------------------------


class _State:
    def __init__(self, count: int) -> None:
        from servekit.sandbox.state import SandboxHost

        self.hosts = [
            SandboxHost(
                n,
                f"servekit-sandbox-{n}",
                f"sandbox-{n}",
                "id",
                "127.0.0.1",
                2221 + n,
                7999 + n,
                "vol",
            )
            for n in range(1, count + 1)
        ]


@pytest.fixture
def fake_sandbox(monkeypatch, tmp_path):
    """No Docker, no Ansible: manager.up and ansible-playbook are recorded, not run."""
    from servekit.sandbox import manager

    calls: list[tuple] = []
    monkeypatch.setattr(
        manager, "up", lambda hosts=1, progress=None: calls.append(("up", hosts)) or _State(hosts)
    )
    monkeypatch.setattr(
        ba, "forget_facts", lambda hosts, path=None: calls.append(("forget", *hosts))
    )

    def playbook(log, inventory=ba.SANDBOX_INVENTORY, playbook=ba.SITE, extra=()):
        calls.append(("playbook", log.name, *extra))
        return ba.PlaybookRun(0, 115.0, CONVERGE, log)

    monkeypatch.setattr(ba, "run_playbook", playbook)
    ctx = bench.Context(logs=tmp_path)
    ctx.say = lambda message: None  # type: ignore[method-assign]
    return ctx, calls


def test_fresh_converge_figures(fake_sandbox, monkeypatch):
    ctx, calls = fake_sandbox
    monkeypatch.setattr(bench_converge, "preflight_floor", lambda state: 0.25)
    monkeypatch.setattr(
        bench_converge,
        "floor_inputs",
        lambda state: {
            "script": {
                "docker_packages": ["docker.io=1"],
                "model_packages": [],
                "sdk_lock": "",
                "model_urls": [],
                "layer_urls": [],
            },
            "mounts": [],
            "add_hosts": {},
            "image": "img",
        },
    )
    steps = {
        "docker_engine": 9.0,
        "model_packages": 1.0,
        "model_sdk": 6.0,
        "model_files": 0.5,
        "image": 20.0,
    }
    monkeypatch.setattr(bh, "run_floor_container", lambda *a, **k: (steps, None))

    def hand(c, empty_cache=False):
        assert empty_cache, "the floor of a first start compiles, as the converge's start did"
        return 40.0

    def unit(c):
        c.unit_starts.append((50.0, 51.0))
        return 50.0, 51.0

    monkeypatch.setattr(bench_converge, "hand_start", hand)
    monkeypatch.setattr(bench_converge, "unit_start", unit)
    monkeypatch.setattr(bench_converge, "start_vllm_if_stopped", lambda: None)
    figures = bench_converge.fresh_converge(ctx)
    assert calls[:4] == [
        ("up", 0),
        ("forget", "sandbox-1"),
        ("up", 1),
        ("playbook", "fresh-converge.log"),
    ]
    assert figures["converge_s"]["median"] == 115.0
    assert figures["changed_tasks"]["median"] == 18
    assert figures["preflight_floor_s"]["n"] == 3
    assert figures["model_floor_s"]["median"] == 7.5
    assert figures["image_vs_floor"]["median"] == pytest.approx((64.374 - 29.5) / 20.0, abs=1e-3)
    assert figures["floors_sum_s"]["median"] == pytest.approx(0.25 + 9 + 20 + 7.5 + 40)
    assert figures["converge_vs_floors"]["median"] == pytest.approx(115 / 76.75, abs=1e-3)
    assert figures["service_start_floor_s"]["median"] == 40.0
    assert not ctx.hand_starts, "a start with the cache emptied is no sample of cold_start's"
    assert ctx.unit_starts == [(50.0, 51.0)] and not ctx.errors
    assert [r["phase"] for r in ctx.details["fresh_converge"]["breakdown"]][-1] == "total"


def test_fresh_converge_keeps_its_figures_when_a_floor_fails(fake_sandbox, monkeypatch):
    ctx, _ = fake_sandbox
    monkeypatch.setattr(bench_converge, "preflight_floor", lambda state: 0.25)
    monkeypatch.setattr(
        bench_converge,
        "floor_inputs",
        lambda state: {
            "script": {
                "docker_packages": [],
                "model_packages": [],
                "sdk_lock": "",
                "model_urls": [],
                "layer_urls": [],
            },
            "mounts": [],
            "add_hosts": {},
            "image": "img",
        },
    )
    monkeypatch.setattr(
        bh, "run_floor_container", lambda *a, **k: ({"docker_engine": 9.0}, "tar: oops")
    )
    monkeypatch.setattr(bench_converge, "hand_start", lambda c, empty_cache: 1 / 0)
    monkeypatch.setattr(bench_converge, "unit_start", lambda c: (50.0, 51.0))
    monkeypatch.setattr(bench_converge, "start_vllm_if_stopped", lambda: None)
    figures = bench_converge.fresh_converge(ctx)
    assert "docker_engine_vs_floor" in figures and "image_floor_s" not in figures
    assert "converge_vs_floors" not in figures and figures["image_s"]["n"] == 1
    assert ctx.errors == ["tar: oops", "vLLM started by hand: division by zero"]


def test_reconverge_figures(fake_sandbox, monkeypatch):
    ctx, calls = fake_sandbox
    monkeypatch.setattr(bench_converge, "ensure_deployed", lambda c: None)
    figures = bench_converge.reconverge(ctx)
    assert [c[1] for c in calls] == ["reconverge-1.log", "reconverge-2.log", "reconverge-3.log"]
    assert figures["reconverge_s"]["runs"] == [115.0] * 3
    assert figures["reconverge_s"]["aim"] == "< 15 s"
    assert figures["changed_tasks"]["median"] == 18
    assert figures["reconverge_without_monitoring_s"]["runs"] == [115.0] * 3  # none in CONVERGE


def test_reconverge_without_the_monitoring_plays(fake_sandbox, monkeypatch):
    ctx, _ = fake_sandbox
    monkeypatch.setattr(bench_converge, "ensure_deployed", lambda c: None)
    monkeypatch.setattr(ba, "role_seconds", lambda profile: {"model": 3.0, "monitoring": 5.5})
    figures = bench_converge.reconverge(ctx)
    assert figures["reconverge_without_monitoring_s"]["runs"] == [109.5] * 3
    assert ctx.details["reconverge"]["seconds_by_role_last_run"]["monitoring"] == 5.5


def test_verify_figures_and_clean_up(fake_sandbox, monkeypatch):
    ctx, calls = fake_sandbox
    ctx.results["fresh_converge"] = {"figures": {"converge_s": br.figure([100.0], "s")}}
    monkeypatch.setattr(bench_converge, "ensure_deployed", lambda c: None)
    times = iter([12.0, 20.0, 13.0, 21.0, 11.0, 19.0])
    seen = []

    def verify_once(inventory, report_dir, log):
        seen.append(ba.load_yaml(inventory)["all"]["children"]["gpu_hosts"]["hosts"])
        return next(times), True

    monkeypatch.setattr(bench_converge, "_verify_once", verify_once)
    figures = bench_converge.verify(ctx)
    assert [c for c in calls if c[0] == "up"] == [("up", 1), ("up", 3), ("up", 1)]
    assert ("playbook", "verify-converge-2-hosts.log", "--limit", "sandbox-2,sandbox-3") in calls
    assert list(seen[0]) == ["sandbox-1"] and list(seen[1]) == [
        "sandbox-1",
        "sandbox-2",
        "sandbox-3",
    ]
    assert figures["verify_1_host_s"]["median"] == 12.0
    assert figures["verify_3_vs_1"]["median"] == pytest.approx(20.0 / 12.0, abs=1e-3)
    assert figures["converge_2_parallel_vs_1"]["median"] == pytest.approx(1.15)


def test_verify_failure_still_removes_the_extra_hosts(fake_sandbox, monkeypatch):
    ctx, calls = fake_sandbox
    monkeypatch.setattr(bench_converge, "ensure_deployed", lambda c: None)
    monkeypatch.setattr(bench_converge, "_verify_once", lambda *a: (10.0, False))
    with pytest.raises(RuntimeError, match="verify failed"):
        bench_converge.verify(ctx)
    assert calls[-1] == ("up", 1)


def test_cold_start_alternates_and_counts_the_starts_of_the_converge(fake_sandbox, monkeypatch):
    ctx, _ = fake_sandbox
    ctx.unit_starts.append((48.0, 49.0))  # the unit's start after fresh_converge's floor
    log = []
    monkeypatch.setattr(bench_runtime, "ensure_deployed", lambda c: None)
    monkeypatch.setattr(bench_runtime, "host_cmd", lambda *a, **k: log.append(a[:3]) or "")
    monkeypatch.setattr(bh, "docker_exec", lambda *a, **k: None)
    monkeypatch.setattr(bench_runtime, "start_vllm_if_stopped", lambda: log.append("ensure"))

    def hand(c, empty_cache=False):
        assert not empty_cache, "the phase's hand starts keep the cache"
        log.append("hand")
        c.hand_starts.append(42.0)
        return 42.0

    def unit(c, empty_cache=False):
        log.append("unit, cache emptied" if empty_cache else "unit")
        starts = c.unit_starts_empty_cache if empty_cache else c.unit_starts
        starts.append((80.0, 81.0) if empty_cache else (50.0, 51.0))
        return starts[-1]

    monkeypatch.setattr(bench_runtime, "hand_start", hand)
    monkeypatch.setattr(bench_runtime, "unit_start", unit)
    figures = bench_runtime.cold_start(ctx)
    assert log[0] == ("systemctl", "stop", "vllm-health.timer")
    assert log[1:-2] == ["hand", "unit", "hand", "unit", "hand"] + ["unit, cache emptied"] * 3
    assert log[-1] == ("systemctl", "start", "vllm-health.timer")
    assert figures["hand_start_to_health_s"]["runs"] == [42.0, 42.0, 42.0]
    assert figures["unit_start_to_health_s"]["runs"] == [48.0, 50.0, 50.0]
    assert figures["unit_start_returns_s"]["median"] == 51.0
    assert figures["server_share"]["median"] == pytest.approx(42.0 / 50.0, abs=1e-3)
    assert figures["unit_start_empty_cache_to_health_s"]["runs"] == [80.0] * 3
    assert figures["kept_cache_share"]["median"] == pytest.approx(50.0 / 80.0, abs=1e-3)

    ctx.hand_starts[:], ctx.unit_starts[:], ctx.unit_starts_empty_cache[:] = [], [], []
    log.clear()  # without a converge: three of each
    bench_runtime.cold_start(ctx)
    assert log[1:-2] == ["hand", "unit"] * 3 + ["unit, cache emptied"] * 3


def test_compile_cache_dir_is_read_from_the_units_docker_run():
    unit = bh.exec_start_argv(UNIT)
    assert bh.compile_cache_dir(unit) == "/var/cache/vllm-host"
    no_env = [a for a in unit if not a.startswith("VLLM_CACHE_ROOT=")]
    assert bh.compile_cache_dir([a for a in no_env if a != "--env"]) is None
    other_mount = ["docker", "run", "--env", "VLLM_CACHE_ROOT=/c", "-v", "/x:/elsewhere", "img"]
    assert bh.compile_cache_dir(other_mount) is None
    short_flags = ["docker", "run", "-e", "VLLM_CACHE_ROOT=/c", "-v", "/srv/c:/c:rw", "img"]
    assert bh.compile_cache_dir(short_flags) == "/srv/c"


def test_recovery_figures(fake_sandbox, monkeypatch):
    ctx, _ = fake_sandbox
    monkeypatch.setattr(bench_runtime, "ensure_deployed", lambda c: None)
    monkeypatch.setattr(bench_runtime, "host_cmd", lambda *a, **k: "")
    events = []
    monkeypatch.setattr(bench_runtime, "wait_started", lambda *a, **k: events.append("started"))
    monkeypatch.setattr(bench_runtime, "sigkill_once", lambda: events.append("kill") or (0.5, 48.0))
    monkeypatch.setattr(
        bench_runtime, "sigstop_once", lambda window: events.append("stop") or (70.0, 150.0)
    )
    figures = bench_runtime.recovery(ctx)
    # A fault only once the unit has finished starting (a freeze during start is systemd's).
    assert events == ["started", "kill", "started", "stop"]
    assert figures["sigkill_healthy_s"]["runs"] == [48.0]
    assert figures["sigstop_detected_s"]["aim"] == "<= 70 s"  # 40 s window + 30 s stop
    assert ctx.details["recovery"]["health_timer_window_s"] == 40


def test_serving_figures_against_a_fake_server(tmp_path):
    server = _Server(("127.0.0.1", 0), _FakeVLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx = bench.Context(
        logs=tmp_path, runs=1, max_tokens=6, url=f"http://127.0.0.1:{server.server_address[1]}"
    )
    try:
        figures = bench_runtime.serving(ctx)
    finally:
        server.shutdown()
        server.server_close()
    assert figures["ttft_c1_s"]["n"] == 4 and figures["ttft_c16_s"]["n"] == 16
    assert figures["output_tokens_per_s_c16"]["n"] == 1
    assert ctx.vllm_version == "0.0-test"


def test_a_failed_phase_is_reported_and_the_run_goes_on(tmp_path):
    ctx = bench.Context(logs=tmp_path)
    ctx.say = lambda message: None  # type: ignore[method-assign]
    phase = bench.Phase("broken", lambda c: 1 / 0, 1, 0.1)
    entry = bench.run_phase(phase, ctx)
    assert entry["figures"] == {} and entry["error"] == "ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in (tmp_path / "broken.error.log").read_text()

"""Bad inventory and variable inputs are refused by the preflight play, before any change.

Each case runs the real `ansible/playbooks/preflight.yml` against a throw-away inventory with
a host in `gpu_hosts`, reached with a local connection: this machine. The host holds the
sandbox's valid settings, overridden by the case's bad value. The preflight play only reads
the host (facts, `df`, PCI devices; on GPU hosts also package lists, the Secure Boot state,
`dockerd --version`) and checks inputs, so running it here changes nothing; the tests also
check that every task it ran is a preflight task and that the case's host reports `changed=0`.

A case passes when its host fails in a preflight check, and the message names the variable
and says what to do about it. The preflight play checks every host before it stops the run,
so most cases share a run: one host each, named by the case, each failure read from the
host's own result lines. A case runs alone when it gives its value with -e (which every host
would get), runs in check mode, needs a second host in the inventory (a Prometheus host apart
from the GPU host, or the other way round: this machine again, under another name), or puts
its host in a group whose checks read the other hosts (monitoring, gateway).
GPU hosts' cases run in check mode (--check) with a recorded `lspci`, the planning mode in which
preflight accepts a hardware profile, so they run on a machine without a GPU too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from ansible_local import local_ansible_env

from servekit.images import vllm_version

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
PLAYBOOK = ANSIBLE / "playbooks" / "preflight.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
HOST = "bad-input-host"
PEER = "bad-input-peer"  # the second host of the cases that need one

# The sandbox's settings (inventory/sandbox/group_vars/gpu_hosts.yml), made valid on any
# machine: an image lock beside the inventory with a fixed digest instead of the sandbox's
# built image, a CA bundle written by the tests, little disk. Everything not set takes the
# roles' defaults.
SANDBOX_REPOSITORY = "servekit-control:5000/servekit/vllm-cpu"
LOCK = {
    "images": {
        f"{SANDBOX_REPOSITORY}:v{vllm_version(ROOT)}": {
            "digest": "sha256:" + "0123456789abcdef" * 4,
            "resolved": "2026-12-06T10:00:00Z",
        }
    }
}
BASELINE: dict = {
    "servekit_accelerator": "cpu",
    "preflight_min_free_gb": 1,
    "servekit_model_endpoint": "http://servekit-control:8090",
    "docker_engine_insecure_registries": ["servekit-control:5000"],
    "vllm_service_image_repository": SANDBOX_REPOSITORY,
    "vllm_service_env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
    "vllm_service_bind_address": "0.0.0.0",
    "vllm_service_allow_unauthenticated": True,
    "vllm_service_start_timeout": 600,
    # Not the sandbox's; a valid path with an "s" in it, which an escaping slip once refused.
    "vllm_service_compile_cache_dir": "/srv/servekit/vllm-cache",
}


def _has_nvidia_gpu() -> bool:
    vendors = Path("/sys/bus/pci/devices").glob("*/vendor")
    return any(v.read_text().strip().lower() == "0x10de" for v in vendors)


def _os_not_this_one() -> list[str]:
    """A supported-OS list without this machine's OS (preflight checks the list, so this
    stands in honestly for a host whose OS servekit does not support)."""
    release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    return ["Debian-12"] if 'VERSION_ID="24.04"' in release else ["Ubuntu-24"]


# A host in gpu_hosts that is to serve on a GPU but has none: this machine when it has no
# NVIDIA GPU, else a recorded GPU-less server (an lspci listing with only a BMC display).
NO_GPU = {"servekit_accelerator": "gpu"} | (
    {"servekit_gpu_profile": str(ROOT / "tests" / "fixtures" / "gpu" / "no_gpu.lspci")}
    if _has_nvidia_gpu()
    else {}
)


def this_host_ipv4() -> str:
    """An IPv4 address of this machine other than loopback: preflight checks that a bind or
    listen address is one of the host's own (the test host is this machine)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return next(a for a in addresses if not a.startswith("127."))


# A GPU host planned from a recorded lspci (check mode): it runs the DCGM exporter, whose image
# the lock of these tests does not hold, so it is pinned here.
GPU_PLANNED = {
    "servekit_accelerator": "gpu",
    "servekit_gpu_profile": str(ROOT / "tests" / "fixtures" / "gpu" / "a10_x1.lspci"),
    "monitoring_dcgm_exporter_image": (
        "nvcr.io/nvidia/k8s/dcgm-exporter:4.4.1-4.5.2-ubuntu22.04@sha256:" + "ab" * 32
    ),
}


@dataclass(frozen=True)
class Case:
    id: str
    overrides: dict
    hint: str  # words of the fix the message must give
    shows: str | None = None  # the bad value, where the message repeats it
    variable: str = ""  # the variable the message must name; default: the one overridden
    extra_vars: bool = False  # give the overrides with -e @file.json instead of the inventory
    groups: tuple[str, ...] = ("gpu_hosts",)  # the inventory groups the host is in
    check_mode: bool = False  # run with --check (a GPU host planned from a recorded lspci)
    peer: tuple[str, ...] = ()  # the groups of a second host (PEER), if the case needs one
    peer_overrides: dict = field(default_factory=dict)  # PEER's settings over the baseline

    @property
    def names(self) -> str:
        return self.variable or next(iter(self.overrides))


VLLM = "vllm_service_"
BATCH = "servekit_max_unavailable"
MONITORED = ("gpu_hosts", "monitoring")  # a GPU host that also runs Prometheus
CASES = [
    # Types: the roles' argument specs refuse these in the preflight entry points.
    Case("port-not-a-number", {VLLM + "port": "eighty"}, "to int", "'eighty'"),
    Case("max-model-len-8k", {VLLM + "max_model_len": "8k"}, "to int", "'8k'"),
    Case("accelerator-tpu", {"servekit_accelerator": "tpu"}, "one of: gpu, cpu", "got: tpu"),
    Case(
        "allow-reboot-yes-please", {"servekit_allow_reboot": "yes please"}, "to bool", "yes please"
    ),
    Case(
        "model-verify-fast", {"servekit_model_verify": "fast"}, "one of: quick, deep", "got: fast"
    ),
    # Values out of range.
    Case("port-zero", {VLLM + "port": 0}, "from 1 to 65535", "=0 "),
    Case("port-negative", {VLLM + "port": -1}, "from 1 to 65535", "=-1 "),
    Case("port-too-big", {VLLM + "port": 70000}, "from 1 to 65535", "=70000 "),
    Case("port-boolean", {VLLM + "port": True}, "from 1 to 65535", "=true ", extra_vars=True),
    Case("max-model-len-zero", {VLLM + "max_model_len": 0}, "e.g. 8192", "=0 "),
    Case("max-model-len-negative", {VLLM + "max_model_len": -5}, "e.g. 8192", "=-5 "),
    Case("gpu-memory-1.5", {VLLM + "gpu_memory_utilization": 1.5}, "at most 1", "=1.5 "),
    Case("tensor-parallel-zero", {VLLM + "tensor_parallel_size": 0}, "at least 1"),
    Case("health-failures-zero", {VLLM + "health_failures": 0}, "at least 1"),
    Case("start-timeout-5", {VLLM + "start_timeout": 5}, "at least 30 seconds"),
    Case("keep-versions-zero", {"model_keep_versions": 0}, "at least 1"),
    Case("site-keep-versions-zero", {"servekit_model_keep_versions": 0}, "set e.g. 2", "=0 "),
    Case("max-workers-zero", {"model_max_workers": 0}, "at least 1"),
    Case("min-free-negative", {"preflight_min_free_gb": -1}, "set the GB"),
    # Formats.
    Case("model-id-without-owner", {"servekit_model_id": "Qwen3-8B"}, "owner/name", '"Qwen3-8B"'),
    Case("role-model-id-without-owner", {"model_id": "Qwen3-8B"}, "owner/name", '"Qwen3-8B"'),
    Case(
        "endpoint-without-scheme",
        {"servekit_model_endpoint": "modelscope.cn"},
        "https://modelscope.cn",
        '"modelscope.cn"',
    ),
    Case("model-root-relative", {"servekit_model_root": "models"}, "absolute path", '"models"'),
    # The batch of `make deploy` on a fleet: an extra variable (MAX_UNAVAILABLE=...).
    Case("max-unavailable-zero", {BATCH: 0}, 'e.g. "25%"', "=0 ", extra_vars=True),
    Case("max-unavailable-words", {BATCH: "half"}, "MAX_UNAVAILABLE=", '"half"', extra_vars=True),
    Case("max-unavailable-150%", {BATCH: "150%"}, 'at most "100%"', '"150%"', extra_vars=True),
    Case("image-unpinned", {VLLM + "image": "vllm/vllm-openai:latest"}, "@sha256:", ":latest"),
    # A tag the lock beside the inventory does not hold: the command that locks it.
    Case(
        "image-tag-not-locked",
        {VLLM + "image_tag": "v0.31.0"},
        "make lock-images INVENTORY=",
        ":v0.31.0",
        variable=VLLM + "image",
    ),
    Case(
        "image-repository-without-registry",
        {VLLM + "image_repository": "vllm/vllm-openai"},
        "docker.io/vllm/vllm-openai",
        '"vllm/vllm-openai"',
    ),
    Case("image-tag-with-slash", {VLLM + "image_tag": "v0.32.0/x"}, "such as v0.32.0", "/x"),
    Case("vllm-version-latest", {"servekit_vllm_version": "latest"}, '"0.32.0"', '"latest"'),
    # Below the floor: a known API-key bypass.
    Case(
        "vllm-version-vulnerable", {"servekit_vllm_version": "0.13.0"}, "CVE-2026-48746", "0.13.0"
    ),
    Case("shutdown-timeout-negative", {VLLM + "shutdown_timeout": -1}, "e.g. 30", "=-1 "),
    Case("reasoning-parser-qwen4", {VLLM + "reasoning_parser": "qwen4"}, "use one of", '"qwen4"'),
    # The name older releases used; 0.32.0 registers openai_gptoss (read from the release).
    Case("reasoning-parser-gpt-oss", {VLLM + "reasoning_parser": "gpt_oss"}, "openai_gptoss"),
    Case("bind-host-name", {VLLM + "bind_address": "my-host"}, "set 127.0.0.1", '"my-host"'),
    Case("served-name-with-space", {VLLM + "served_model_name": "Qwen3 8B"}, "without spaces"),
    Case("shm-size-garbage", {VLLM + "shm_size": "lots"}, 'write e.g. "16g"', '"lots"'),
    Case(
        "compile-cache-relative",
        {VLLM + "compile_cache_dir": "cache/vllm"},
        "such as /var/cache/vllm",
        '"cache/vllm"',
    ),
    Case("compile-cache-root", {VLLM + "compile_cache_dir": "/"}, "absolute path below /", '"/"'),
    Case(
        "insecure-registry-with-scheme",
        {"docker_engine_insecure_registries": ["http://reg:5000"]},
        "without a scheme",
        "http://reg:5000",
    ),
    Case(
        "registry-mirror-without-scheme",
        {"docker_engine_registry_mirrors": ["mirror.lan"]},
        "with a scheme",
        "mirror.lan",
    ),
    Case("ca-bundle-missing", {"model_ca_bundle": "/nonexistent/ca.pem"}, "leave it empty"),
    Case("sdk-lock-missing", {"model_sdk_lock": "/nonexistent/sdk.lock.txt"}, "--hash=sha256:"),
    # Repository keys are named by their full fingerprint; a key ID can be forged.
    Case(
        "docker-key-short-id",
        {"docker_engine_repo_key_fingerprint": "0EBFCD88"},
        "all 40 hex digits",
        '"0EBFCD88"',
    ),
    Case(
        "cuda-key-not-hex",
        {"nvidia_driver_repo_key_fingerprint": "see NVIDIA's blog"},
        "all 40 hex digits",
    ),
    Case(
        "toolkit-key-long-id",
        {"nvidia_container_toolkit_repo_key_fingerprint": "DDCAE044F796ECB0"},
        "all 40 hex digits",
        '"DDCAE044F796ECB0"',
    ),
    # The API firewall's allow-list: IPv4 networks in a real list, on an IPv4 publish.
    Case(
        "firewall-prefix-33",
        {VLLM + "firewall_allowed_cidrs": ["10.0.0.0/8", "10.0.0.0/33"]},
        "at most /32",
        '"10.0.0.0/33" has a prefix length above 32',
    ),
    Case(
        "firewall-not-a-cidr",
        {VLLM + "firewall_allowed_cidrs": ["not-a-cidr"]},
        "IPv4 address (192.0.2.10)",
        '"not-a-cidr"',
    ),
    Case(
        "firewall-host-bits",
        {VLLM + "firewall_allowed_cidrs": ["10.0.0.1/8"]},
        "the network is 10.0.0.0/8",
        '"10.0.0.1/8"',
    ),
    Case(
        "firewall-ipv6-network",
        {VLLM + "firewall_allowed_cidrs": ["2001:db8::/32"]},
        "IPv4 only",
        '"2001:db8::/32"',
    ),
    Case(
        "firewall-not-a-list",
        {VLLM + "firewall_allowed_cidrs": "10.0.0.0/8"},
        "write a YAML list",
        '"10.0.0.0/8" is a str',
    ),
    # Who may read /metrics besides the host: IPv4 networks in a real list.
    Case(
        "metrics-cidr-is-a-name",
        {VLLM + "metrics_allowed_cidrs": ["prometheus.example.com"]},
        "the route gate cannot admit to /metrics",
        '"prometheus.example.com" is not an IP address or network',
    ),
    Case(
        "metrics-cidrs-not-a-list",
        {VLLM + "metrics_allowed_cidrs": "10.0.5.0/24"},
        "is not a list",
        '"10.0.5.0/24"',
    ),
    # The route allow-list: a real list of plain paths, /health kept, /metrics not in it.
    Case(
        "routes-without-health",
        {VLLM + "allowed_routes": ["/v1/models", "/v1/chat/completions"]},
        "add /health",
        "lacks /health",
    ),
    Case(
        "routes-a-string",
        {VLLM + "allowed_routes": "/health,/v1/models"},
        "must be a YAML list",
        '"/health,/v1/models"',
    ),
    Case(
        "routes-climb-out",
        {VLLM + "allowed_routes": ["/health", "/v1/../load"]},
        "no '..'",
        '"/v1/../load"',
    ),
    Case(
        "routes-list-metrics",
        {VLLM + "allowed_routes": ["/health", "/metrics"]},
        "vllm_service_metrics_allowed_cidrs",
        "lists /metrics",
    ),
    Case(
        "firewall-on-ipv6-bind",
        {VLLM + "bind_address": "::", VLLM + "firewall_allowed_cidrs": ["10.0.0.0/8"]},
        "bind to 0.0.0.0",
        '"::"',
        variable=VLLM + "firewall_allowed_cidrs",
    ),
    # Security: beyond loopback only with a key, or with a real boolean that allows none.
    Case(
        "open-bind-without-key",
        {VLLM + "allow_unauthenticated": False, VLLM + "api_key": ""},
        "bind to 127.0.0.1",
        variable=VLLM + "api_key",
    ),
    Case("api-key-with-space", {VLLM + "api_key": "sk one two"}, "without them"),
    Case("api-key-short", {VLLM + "api_key": "k" * 31}, "at least 32", "31 characters"),
    # Inputs that reach a directory name, the unit's command line or the env file.
    Case("revision-dot-dot", {"servekit_model_revision": ".."}, "e.g. master", '".."'),
    Case("revision-current", {"servekit_model_revision": "current"}, 'not "current"', '"current"'),
    Case(
        "revision-with-space", {"servekit_model_revision": "v1 --x"}, "letters, digits", '"v1 --x"'
    ),
    Case("revision-command", {"servekit_model_revision": "$(reboot)"}, "e.g. master", "$(reboot)"),
    Case("served-name-colon", {VLLM + "served_model_name": "a:rw"}, "no ':'", '"a:rw"'),
    Case(
        "extra-args-api-key",
        {VLLM + "extra_args": ["--api-key=sk-" + "x" * 40]},
        "set vllm_service_api_key instead",
        "--api-key=",
    ),
    Case(
        "extra-args-remote-code",
        {VLLM + "extra_args": ["--trust-remote-code"]},
        "allow_unsafe_args",
    ),
    Case(
        "extra-args-newline",
        {VLLM + "extra_args": ["--max-num-seqs", "8\nExecStartPre=/bin/sh"]},
        "one line",
    ),
    Case("env-dev-mode", {VLLM + "env": {"VLLM_SERVER_DEV_MODE": "1"}}, "allow_unsafe_args"),
    Case("env-newline", {VLLM + "env": {"A": "1\nVLLM_API_KEY=x"}}, "one line"),
    Case(
        "metrics-guard-ipv6-bind",
        {VLLM + "bind_address": "::"},
        "vllm_service_metrics_public: true",
        '"::"',
        variable=VLLM + "metrics_public",
    ),
    Case(
        "metrics-guard-without-iptables",
        {"docker_engine_daemon_options": {"iptables": False}},
        "with Docker's iptables on",
        variable=VLLM + "metrics_public",
    ),
    Case("bind-address-not-on-host", {VLLM + "bind_address": "192.0.2.77"}, "not an address of"),
    # Kubespray-style strict booleans: a quoted "false" is a string, and true in a bare condition.
    Case(
        "allow-unauth-string",
        {VLLM + "allow_unauthenticated": "false"},
        "without quotes",
        '"false"',
    ),
    Case(
        "reboot-string", {"servekit_allow_reboot": "false"}, "pass JSON", '"false"', extra_vars=True
    ),
    Case("hold-string", {"nvidia_driver_hold_packages": "no"}, "without quotes", '"no"'),
    Case("verify-string", {"nvidia_container_toolkit_verify": "true"}, "without quotes", '"true"'),
    # Monitoring (optional): the host also runs Prometheus (inventory group monitoring).
    Case(
        "monitoring-without-gpu-hosts",
        {},
        "put the vLLM servers in group gpu_hosts",
        variable="monitoring_gpu_group",
        groups=("monitoring",),
    ),
    Case(
        "kv-cache-threshold-1.5",
        {"monitoring_alert_kv_cache_usage": 1.5},
        "at most 1",
        "=1.5 ",
        groups=MONITORED,
    ),
    Case(
        "kv-cache-threshold-negative",
        {"monitoring_alert_kv_cache_usage": -0.2},
        "above 0",
        "=-0.2 ",
        groups=MONITORED,
    ),
    Case(
        "ttft-threshold-text",
        {"monitoring_alert_ttft_p95_seconds": "fast"},
        "to float",  # Ansible's float conversion does not repeat the value
        groups=MONITORED,
    ),
    Case(
        "ttft-threshold-zero",
        {"monitoring_alert_ttft_p95_seconds": 0},
        "must be above 0",
        "=0 ",
        groups=MONITORED,
    ),
    Case(
        "disk-free-ratio-2",
        {"monitoring_alert_model_disk_free_ratio": 2},
        "between 0 and 1",
        "=2 ",
        groups=MONITORED,
    ),
    Case(
        "gpu-temp-300",
        {"monitoring_alert_gpu_temp_celsius": 300},
        "between 1 and 149",
        "=300 ",
        groups=MONITORED,
    ),
    Case(
        "scrape-interval-without-unit",
        {"monitoring_scrape_interval": "15"},
        "e.g. 15s",
        '"15"',
        groups=MONITORED,
    ),
    Case(
        "scrape-interval-in-words",
        {"monitoring_scrape_interval": "15 seconds"},
        "e.g. 15s",
        '"15 seconds"',
        groups=MONITORED,
    ),
    Case(
        "listen-address-without-port",
        {"monitoring_prometheus_listen_address": "0.0.0.0"},
        "127.0.0.1:9090",
        '"0.0.0.0"',
        groups=MONITORED,
    ),
    Case(
        "dcgm-image-unpinned",
        {"monitoring_dcgm_exporter_image": "nvcr.io/nvidia/k8s/dcgm-exporter:latest"},
        "@sha256:",
        ":latest",
        groups=MONITORED,
    ),
    # The exporters' monitoring address: one IPv4 address of the host, firewalled beyond loopback.
    Case(
        "exporters-on-every-address",
        {"monitoring_exporter_listen_address": "0.0.0.0"},
        "set 127.0.0.1",
        '"0.0.0.0"',
        groups=MONITORED,
    ),
    Case(
        "exporters-on-a-host-name",
        {"monitoring_exporter_listen_address": "gpu-1.lan"},
        "set 127.0.0.1",
        '"gpu-1.lan"',
        groups=MONITORED,
    ),
    Case(
        "exporters-address-not-on-host",
        {"monitoring_exporter_listen_address": "192.0.2.77"},
        "not an address of",
        '"192.0.2.77"',
        groups=MONITORED,
    ),
    Case(
        "exporters-cidrs-not-a-list",
        {"monitoring_exporter_allowed_cidrs": "10.0.5.0/24"},
        "write a YAML list",
        '"10.0.5.0/24"',
        groups=MONITORED,
    ),
    Case(
        "exporters-cidr-is-a-name",
        {"monitoring_exporter_allowed_cidrs": ["prometheus.lan"]},
        "IPv4 address (192.0.2.10)",
        '"prometheus.lan" is not an IP address or network',
        groups=MONITORED,
    ),
    # Beyond loopback, a firewall that admits nobody but the host, while Prometheus is elsewhere.
    Case(
        "exporters-open-to-no-scraper",
        {"monitoring_exporter_listen_address": this_host_ipv4()},
        "list the Prometheus hosts' addresses",
        variable="monitoring_exporter_allowed_cidrs",
        peer=("monitoring",),
    ),
    # The Prometheus host: exporters of another host left on loopback cannot be scraped.
    Case(
        "exporters-of-a-peer-on-loopback",
        {},
        "set monitoring_exporter_listen_address to each host's own address",
        PEER,
        variable="monitoring_exporter_listen_address",
        groups=("monitoring",),
        peer=("gpu_hosts",),
        peer_overrides={VLLM + "metrics_allowed_cidrs": ["10.0.0.0/8"]},
    ),
    Case(
        "exporters-firewall-without-docker-iptables",
        GPU_PLANNED
        | {
            "monitoring_exporter_listen_address": this_host_ipv4(),
            "monitoring_exporter_allowed_cidrs": ["10.0.0.0/8"],
            "docker_engine_daemon_options": {"iptables": False},
            VLLM + "metrics_public": True,
        },
        "remove that option",
        variable="monitoring_exporter_listen_address",
        groups=MONITORED,
        check_mode=True,
    ),
    # Two services of one host on one port: both settings are named, with a free port for one.
    Case(
        "port-clash-prometheus-vllm",
        {"monitoring_prometheus_listen_address": "127.0.0.1:8000"},
        "e.g. monitoring_prometheus_listen_address: 127.0.0.1:8001",
        "vllm_service_port=8000",
        groups=MONITORED,
    ),
    Case(
        "port-clash-node-exporter-vllm",
        {"monitoring_node_exporter_port": 8000},
        "e.g. monitoring_node_exporter_port: 8001",
        "vllm_service_port=8000",
        groups=MONITORED,
    ),
    # A gateway on a GPU host: both default to port 8000.
    Case(
        "port-clash-gateway-vllm",
        {"gateway_allow_unauthenticated": True},
        "e.g. gateway_port: 8001",
        "vllm_service_port=8000",
        variable="gateway_port",
        groups=("gpu_hosts", "gateway"),
    ),
    Case(
        "port-clash-gateway-stats-prometheus",
        {"gateway_allow_unauthenticated": True, "gateway_port": 8080, "gateway_stats_port": 9090},
        "e.g. monitoring_prometheus_listen_address: 127.0.0.1:9091",
        'monitoring_prometheus_listen_address="127.0.0.1:9090"',
        variable="gateway_stats_port",
        groups=("gpu_hosts", "gateway", "monitoring"),
    ),
    Case(
        "port-clash-dcgm-node-exporter",
        GPU_PLANNED | {"monitoring_dcgm_exporter_port": 9100},
        "e.g. monitoring_dcgm_exporter_port: 9101",
        "monitoring_node_exporter_port=9100",
        variable="monitoring_dcgm_exporter_port",
        groups=MONITORED,
        check_mode=True,
    ),
    # The host itself.
    Case(
        "gpu-host-without-gpu", NO_GPU, "servekit_accelerator: cpu", variable="servekit_accelerator"
    ),
    Case("too-little-disk", {"preflight_min_free_gb": 100000}, "lower preflight_min_free_gb"),
    Case("unsupported-os", {"preflight_supported_os": _os_not_this_one()}, "Reinstall the host"),
]


# Not bad inputs: the valid baseline on a host that also runs Prometheus; its exporters on the
# host's own address, firewalled, for a Prometheus on another host (PEER); a GPU host (planned
# in check mode) that runs the DCGM exporter too, so both exporters are compared with every port;
# the largest batch `make deploy` accepts.
MONITORED_BASELINE = Case("baseline-monitoring", {}, "", groups=MONITORED)
WHOLE_FLEET = Case("max-unavailable-100%", {BATCH: "100%"}, "", extra_vars=True)
VALID = [
    MONITORED_BASELINE,
    WHOLE_FLEET,
    Case(
        "baseline-exporters-firewalled",
        # The scrapers allowed by default: those allowed to read vLLM's /metrics.
        {
            "monitoring_exporter_listen_address": this_host_ipv4(),
            VLLM + "metrics_allowed_cidrs": ["10.0.0.0/8"],
        },
        "",
        peer=("monitoring",),
    ),
    Case("baseline-gpu-monitoring", GPU_PLANNED, "", groups=MONITORED, check_mode=True),
]


def _preflight_task_names() -> set[str]:
    """Every task the preflight play may run: its own, the preflight role's, and the roles'
    preflight tasks."""
    names = {"Gathering Facts"}
    for play in yaml.safe_load(PLAYBOOK.read_text()):
        names |= {task["name"] for task in play["tasks"]}
    for tasks in [
        *ANSIBLE.glob("roles/preflight/tasks/*.yml"),
        *ANSIBLE.glob("roles/*/tasks/preflight.yml"),
    ]:
        names |= {task["name"] for task in yaml.safe_load(tasks.read_text())}
    return names


PREFLIGHT_TASKS = _preflight_task_names()
PORT_CHECK = "Preflight | Refuse two services that would listen on the same port"
STOP = "Preflight | Stop before any change unless every host passed"
VALIDATION = "Validating arguments against arg spec '"
TASK_HEADER = re.compile(r"^TASK \[(?:[\w.]+ : )?(.*)\] \*+\s*$")
# A failed task's result line; a delegated task's says "[host -> localhost]".
FATAL = re.compile(r"^fatal: \[(?P<host>[^\]\s]+)(?: -> [^\]]+)?\]: \w+! => (?P<result>\{.*\})$")
LOCAL = {
    "ansible_connection": "local",
    "ansible_python_interpreter": sys.executable,
    # The play's `become: true` would need sudo; the checks need no privileges.
    "ansible_become": False,
}
# Cases whose host is in these groups only, and that need nothing else of their own (no -e, no
# --check, no PEER), share runs, each as a host of its own named by the case. A host in group
# monitoring or gateway could not: their checks judge every host of gpu_hosts, so the other
# cases' hosts would count as servers for it to scrape or to balance.
SHARED_GROUPS = {("gpu_hosts",)}
BATCH_SIZE = 20  # hosts per shared run, at most: beyond about 20, each host costs more


def _shares_runs(case: Case) -> bool:
    """Whether the case may be one host among others of one run: its settings are its host's
    alone, and no check of its groups reads the other hosts of the inventory."""
    alone = case.extra_vars or case.check_mode or case.peer
    return not alone and case.groups in SHARED_GROUPS


@dataclass
class Run:
    rc: int  # of the whole ansible-playbook run
    output: str
    tasks: list[str]  # task names in the order they ran (on any host of the run)
    failed_task: str | None  # the task in which this case's host failed
    message: str | None  # "msg" of the failed task
    host: str = HOST  # the case's host in the inventory


def _run(case: Case | None, workdir: Path, facts: Path | None = None) -> Run:
    """The case alone in its inventory, as host HOST (and PEER, if the case has one)."""
    return _play({HOST: case}, workdir, facts)[HOST]


def _run_batch(cases: list[Case], workdir: Path, facts: Path | None = None) -> dict[str, Run]:
    """Cases that share a run (_shares_runs), one host each, named by the case's id."""
    assert all(_shares_runs(case) for case in cases), [c.id for c in cases]
    runs = _play({case.id: case for case in cases}, workdir, facts)
    return {case.id: runs[case.id] for case in cases}


def _play(
    cases: dict[str, Case | None], workdir: Path, facts: Path | None, playbook: Path = PLAYBOOK
) -> dict[str, Run]:
    """Runs the playbook (preflight's unless given) once against an inventory with a host per
    case (the baseline's settings with the case's overrides), and reads each host's result."""
    if facts is not None:
        # This machine's facts, gathered by the baseline run: the play then skips gathering
        # them again (gathering = smart), which saves a second or two per host.
        shutil.copytree(facts, workdir / "facts")
    ca_bundle = workdir / "ca.pem"
    ca_bundle.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(workdir / "hosts.yml"), str(playbook)]
    members: dict[str, tuple[dict, tuple[str, ...]]] = {}
    for name, case in cases.items():
        host = dict(BASELINE, model_ca_bundle=str(ca_bundle))
        if case is not None and (case.extra_vars or case.check_mode or case.peer):
            assert len(cases) == 1, f"{case.id} cannot share a run"
        if case is not None and case.check_mode:
            cmd.append("--check")
        if case is not None and case.extra_vars:
            (workdir / "extra.json").write_text(json.dumps(case.overrides))
            cmd += ["-e", f"@{workdir / 'extra.json'}"]
        elif case is not None:
            host.update(case.overrides)
        members[name] = (host | LOCAL, case.groups if case is not None else ("gpu_hosts",))
        if case is not None and case.peer:
            peer = dict(BASELINE, model_ca_bundle=str(ca_bundle)) | case.peer_overrides
            members[PEER] = (peer | LOCAL, case.peer)
    # The baseline's facts are HOST's: every host of this run is the same machine. (The cache
    # file's name is the host's with a prefix of Ansible's, such as "s1_".)
    for cached in (workdir / "facts").glob(f"*{HOST}") if facts is not None else ():
        for name in members.keys() - {HOST}:
            shutil.copy(cached, cached.with_name(cached.name.removesuffix(HOST) + name))
    children: dict = {}
    for name, (variables, groups) in members.items():
        for group in groups:
            children.setdefault(group, {"hosts": {}})["hosts"][name] = variables
    inventory = {"all": {"children": children}}
    (workdir / "hosts.yml").write_text(json.dumps(inventory, indent=2))
    (workdir / "images.lock.yml").write_text(yaml.safe_dump(LOCK))
    env = local_ansible_env(workdir)
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    output = proc.stdout + proc.stderr
    tasks: list[str] = []
    runs = {name: Run(proc.returncode, output, tasks, None, None, name) for name in cases}
    for line in proc.stdout.splitlines():
        if header := TASK_HEADER.match(line):
            tasks.append(header.group(1))
            continue
        fatal = FATAL.match(line)
        run = runs.get(fatal.group("host")) if fatal else None
        # The first failure of the host is the one that took it out of the play.
        if fatal and run is not None and run.failed_task is None:
            run.failed_task = tasks[-1] if tasks else None
            run.message = json.loads(fatal.group("result")).get("msg")
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The valid baseline, then every case from the baseline's facts, several runs at a time:
    the cases that can share a run in batches of BATCH_SIZE hosts, the others one run each."""
    baseline_dir = tmp_path_factory.mktemp("baseline")
    results = {"baseline": _run(None, baseline_dir)}
    facts = baseline_dir / "facts" if (baseline_dir / "facts").is_dir() else None
    cases = [*CASES, *VALID]
    shared = [case for case in cases if _shares_runs(case)]
    count = -(-len(shared) // BATCH_SIZE)  # batches of at most BATCH_SIZE, of even sizes
    batches = [shared[i::count] for i in range(count)]
    alone = [case for case in cases if not _shares_runs(case)]
    # Made here, not in the threads: pytest's temporary directories are not thread-safe.
    batch_dirs = [tmp_path_factory.mktemp(f"batch{i}") for i in range(len(batches))]
    alone_dirs = [tmp_path_factory.mktemp(case.id) for case in alone]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        # The batches first: the longest runs.
        batch_runs = [
            pool.submit(_run_batch, b, d, facts) for b, d in zip(batches, batch_dirs, strict=True)
        ]
        alone_runs = [
            pool.submit(_run, c, d, facts) for c, d in zip(alone, alone_dirs, strict=True)
        ]
        for future in batch_runs:
            results |= future.result()
        results |= {case.id: f.result() for case, f in zip(alone, alone_runs, strict=True)}
    assert set(results) == {"baseline", *(case.id for case in cases)}
    return results


def _check_stayed_in_preflight(run: Run) -> None:
    assert run.tasks, run.output
    strangers = [
        name
        for name in run.tasks
        if name not in PREFLIGHT_TASKS and not name.startswith(VALIDATION)
    ]
    assert not strangers, f"tasks outside the preflight checks ran: {strangers}\n{run.output}"
    host = re.escape(run.host)
    assert re.search(rf"^{host}\s*:.*\bchanged=0\b", run.output, re.M), run.output


def test_cases_are_distinct():
    assert len({c.id for c in CASES}) == len(CASES)
    keys = {
        json.dumps([c.overrides, c.groups, c.check_mode, c.peer, c.peer_overrides], sort_keys=True)
        for c in CASES
    }
    assert len(keys) == len(CASES)
    assert len(CASES) >= 15


def test_valid_baseline_passes_preflight(runs):
    run = runs["baseline"]
    assert run.rc == 0, run.output
    assert re.search(rf"^{HOST}\s*:.*\bfailed=0\b", run.output, re.M), run.output
    _check_stayed_in_preflight(run)
    # Every role's preflight entry point validated its argument spec.
    validated = [name for name in run.tasks if name.startswith(VALIDATION)]
    assert len(validated) == 7, validated
    # The last play compared the ports of the host's services.
    assert run.tasks[-1] == PORT_CHECK, run.tasks


def test_valid_monitoring_settings_pass_preflight(runs):
    """The baseline host in group monitoring too: the monitoring role's defaults pass."""
    run = runs[MONITORED_BASELINE.id]
    assert run.rc == 0, run.output
    _check_stayed_in_preflight(run)
    assert "Monitoring | Check the Prometheus settings" in run.tasks, run.tasks


def test_a_batch_of_every_host_passes_preflight(runs):
    run = runs[WHOLE_FLEET.id]
    assert run.rc == 0, run.output
    _check_stayed_in_preflight(run)


@pytest.mark.parametrize("case", VALID[2:], ids=[c.id for c in VALID[2:]])
def test_valid_exporter_settings_pass_preflight(runs, case):
    """Exporters firewalled on the host's address, and a GPU host with both exporters: the
    settings pass, and every host's ports were compared."""
    run = runs[case.id]
    assert run.rc == 0, run.output
    _check_stayed_in_preflight(run)
    assert "Monitoring | Check the exporter settings" in run.tasks, run.tasks
    assert run.tasks[-1] == PORT_CHECK, run.tasks


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_preflight(runs, case):
    run = runs[case.id]
    # A host that passed is stopped by the play's last task, if another host failed.
    assert run.rc != 0 and run.failed_task != STOP, f"{case.id} was accepted\n{run.output}"
    _check_stayed_in_preflight(run)
    assert run.failed_task is not None and run.message, run.output
    assert run.failed_task in PREFLIGHT_TASKS or run.failed_task.startswith(VALIDATION)
    # The message names the variable the inventory sets, says what to do, and shows the value.
    assert case.names in run.message, run.message
    assert case.hint in run.message, run.message
    if case.shows is not None:
        assert case.shows in run.message, run.message


def test_every_gpu_host_is_checked_then_no_later_play_runs(tmp_path):
    """Two GPU hosts with bad inputs, refused in different roles' checks, and a good one: one
    run reports both refusals, then stops before any later play, also one for other hosts."""
    for playbook in ("site.yml", "rolling.yml"):
        plays = yaml.safe_load((PLAYBOOK.parent / playbook).read_text())
        assert plays[0]["ansible.builtin.import_playbook"] == PLAYBOOK.name, playbook
    markers = tmp_path / "markers"
    markers.mkdir()
    later = [
        {
            "name": f"A later play on {hosts}",
            "hosts": hosts,
            "gather_facts": False,
            "tasks": [
                {
                    "name": f"Leave a marker of the play on {hosts}",
                    "ansible.builtin.copy": {
                        "content": hosts,
                        "dest": f"{markers}/{hosts}-{{{{ inventory_hostname }}}}",
                        "mode": "0644",
                    },
                }
            ],
        }
        for hosts in ("gpu_hosts", "bystanders", "all")
    ]
    playbook = tmp_path / "site.yml"
    imported = {"name": "Preflight", "ansible.builtin.import_playbook": str(PLAYBOOK)}
    playbook.write_text(yaml.safe_dump([imported, *later], sort_keys=False))
    disk, port = (
        next(c for c in CASES if c.id == name) for name in ("too-little-disk", "port-too-big")
    )
    bystander = Case("bystander", {}, "", groups=("bystanders",))  # in no group preflight checks
    runs = _play(
        {disk.id: disk, port.id: port, "good": None, bystander.id: bystander},
        tmp_path,
        None,
        playbook,
    )
    run = runs["good"]
    assert run.rc != 0, run.output
    # Both refusals, though the first (the preflight role's) came before the second's role ran.
    for case in (disk, port):
        refused = runs[case.id]
        assert refused.failed_task in PREFLIGHT_TASKS, run.output
        assert case.names in refused.message and case.hint in refused.message, refused.message
    assert run.tasks.index(runs[disk.id].failed_task) < run.tasks.index(runs[port.id].failed_task)
    # The good host was stopped by the play's last task, which names both failed hosts.
    assert run.failed_task == STOP, run.output
    assert f"2 of 3 hosts did not pass preflight ({disk.id}, {port.id};" in run.message
    # No later play ran, on any host.
    assert not list(markers.iterdir()), run.output
    assert not any(name.startswith("Leave a marker") for name in run.tasks), run.tasks
    assert "PLAY [A later play" not in run.output, run.output
    for case_id in (disk.id, port.id, "good"):
        _check_stayed_in_preflight(runs[case_id])

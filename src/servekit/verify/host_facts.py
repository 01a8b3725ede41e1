"""What the host checks (``host_checks/``) read on a host, and how: the vLLM unit's ExecStart
(its image, its GPU arguments), files and commands as root, the journal; secrets redacted.

Settings come from the inventory, with the roles' defaults where it says nothing. The
testinfra ansible backend does not template: a value that is still a Jinja template or a
vault secret counts as unknown, and the checks that need it read what the deployment wrote
on the host instead (the unit file, the env file, the route gate's settings file).
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from servekit.checkout import role_defaults

UNIT_FILE = "/etc/systemd/system/vllm.service"
ENV_FILE = "/etc/vllm/vllm.env"
#: The route gate's settings (the API key among them), mounted into the container by directory.
GATE_DIR = "/etc/vllm/gate"
GATE_FILE = f"{GATE_DIR}/gate.json"
CONTAINER = "vllm"
#: Where the unit mounts the model in the container: `vllm serve`'s positional argument.
CONTAINER_MODEL_DIR = "/models/"

# Site-wide settings that the roles read with `servekit_* | default(...)`.
SITE_DEFAULTS = {
    "servekit_model_id": "Qwen/Qwen3-8B",
    "servekit_model_root": "/opt/models",
    "servekit_accelerator": "gpu",
}
#: The roles whose settings the host checks compare.
DEFAULT_ROLES = ("vllm_service", "nvidia_driver", "nvidia_container_toolkit")


def host_defaults() -> dict[str, Any]:
    """What a host has where its inventory says nothing: the plain (non-template) defaults of
    the roles the checks compare, and the site-wide defaults."""
    return {**role_defaults(*DEFAULT_ROLES, plain=True), **SITE_DEFAULTS}


def journal(host, unit: str, lines: int = 40) -> str:
    return host.run("journalctl -u %s -n %s --no-pager", unit, str(lines)).stdout


def run_as_root(host, command: str, *args: str):
    """``host.run(command, *args)``, again with sudo when it failed and the connection is not
    root already."""
    result = host.run(command, *args)
    if result.rc != 0 and host.user().name != "root":
        with host.sudo():
            result = host.run(command, *args)
    return result


def read_as_root(host, path: str) -> str | None:
    """A file's text, read as root; None when even root cannot read it."""
    result = run_as_root(host, "cat -- %s", path)
    return result.stdout if result.rc == 0 else None


def exec_start_args(unit_text: str) -> list[str]:
    """The words of the (first) ExecStart= of a unit file, with `\\` continuations joined."""
    joined = re.sub(r"\\\n", " ", unit_text)
    for line in joined.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name == "ExecStart":
            return shlex.split(value.lstrip("-@:+!"))
    return []


def image_of(docker_run_args: list[str]) -> str | None:
    """The image of a `docker run ... IMAGE /models/<name> ...` line as the vLLM unit writes
    it (`vllm serve MODEL`: the model follows the image)."""
    for i, word in enumerate(docker_run_args[1:], start=1):
        before = docker_run_args[i - 1]
        if word.startswith(CONTAINER_MODEL_DIR) and not before.startswith("-"):
            return before
    return None


def gpu_args_of(docker_run_args: list[str]) -> list[str]:
    """How the unit hands GPUs to the container: `--gpus X` and/or CDI `--device` names."""
    out: list[str] = []
    for i, word in enumerate(docker_run_args[:-1]):
        nxt = docker_run_args[i + 1]
        if word == "--gpus" or (word == "--device" and nxt.startswith("nvidia.com/")):
            out += [word, nxt]
    out += [w for w in docker_run_args if w.startswith("--gpus=")]
    return out


def gate_key(text: str) -> str | None:
    """The ``api_key`` of the route gate's settings file; None when it sets none. ValueError
    (naming no content: the file holds the key) when the text is not such a file."""
    try:
        settings = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    key = settings.get("api_key") if isinstance(settings, dict) else None
    if not isinstance(key, str):
        raise ValueError('no "api_key" string')
    return key or None


def env_value(text: str, name: str) -> str | None:
    """The value an env file (`docker run --env-file`) gives ``name``; None when none or empty."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == name:
            return value.strip().strip("'\"") or None
    return None


_KEY_IN_ARGS = re.compile(r"(--api-key[= ]+|VLLM_API_KEY=)(\S+)")


def redact(text: str, *secrets: str | None) -> str:
    """``text`` without the keys: the known secrets, and whatever follows --api-key or
    VLLM_API_KEY= (a key that the host's files do not hold is still a key)."""
    # Longest first: a key that contains another is replaced whole.
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "<API key>")

    def hide(match: re.Match[str]) -> str:
        if match.group(2).startswith("<API"):
            return match.group(0)
        return match.group(1) + "<redacted>"

    return _KEY_IN_ARGS.sub(hide, text)

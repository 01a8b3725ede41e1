"""The vllm-stack chart as the k8s-values tests see it: its values.yaml and values.schema.json
(tests/fixtures/production-stack/, copied at the pinned commit), Helm's merge of a values file
over them, and what the chart's templates at that commit make of the merged values, reduced to
the fields the tests check (helm/templates/deployment-vllm-multi.yaml, pvc.yaml,
shared-storage.yaml and the engine strategy and probes of _helpers.tpl)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CHART = Path(__file__).resolve().parents[1] / "fixtures" / "production-stack"
SHARED_MOUNT = "/data/shared-pvc-storage"
MODEL_MOUNT = "/data"
# Kubernetes quantities as a whole number with an optional suffix: the subset these values use.
QUANTITY = re.compile(r"^[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


@cache
def chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@cache
def chart_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def helm_merge(defaults: Any, overrides: Any) -> Any:
    """Helm's coalescing of a values file over the chart's: maps merge key by key, anything
    else (lists included) replaces the default, and null removes the key."""
    if not (isinstance(defaults, dict) and isinstance(overrides, dict)):
        return overrides
    merged = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = helm_merge(defaults.get(key), value)
    return merged


def install(values: dict[str, Any]) -> dict[str, Any]:
    """The values Helm renders with (validated, as Helm does, against the chart's schema)."""
    merged = helm_merge(chart_defaults(), values)
    jsonschema.Draft202012Validator(chart_schema()).validate(merged)
    return merged


@dataclass(frozen=True)
class Claim:
    name: str
    access_modes: tuple[str, ...]
    storage_class: str | None
    pods: int


@dataclass(frozen=True)
class EnginePod:
    """One model spec's pods as deployment-vllm-multi.yaml writes them."""

    spec: dict[str, Any]
    runtime_class: str | None
    env: dict[str, str]
    mounts: dict[str, str]  # mount path -> claim name
    shm_size_limit: str | None


def _shared_claim(chart: dict[str, Any]) -> str | None:
    return "vllm-shared-pvc-storage-claim" if chart["sharedPvcStorage"]["enabled"] else None


def _model_claim(spec: dict[str, Any]) -> str | None:
    storage = spec.get("pvcStorage")
    return f"vllm-{spec['name']}-storage-claim" if isinstance(storage, str) and storage else None


def engine_pods(chart: dict[str, Any]) -> list[EnginePod]:
    engine = chart["servingEngineSpec"]
    pods = []
    for spec in engine["modelSpec"]:
        if spec.get("enabled") is False:
            continue
        if _shared_claim(chart):
            hf_home = SHARED_MOUNT
        elif "pvcStorage" in spec:
            hf_home = MODEL_MOUNT
        else:
            hf_home = "/tmp"
        mounts = {}
        if _model_claim(spec):
            mounts[MODEL_MOUNT] = _model_claim(spec)
        if _shared_claim(chart):
            mounts[SHARED_MOUNT] = _shared_claim(chart)
        env = {"HF_HOME": hf_home}
        # Later entries win, as for a container's duplicate variables.
        for entry in engine.get("env", []) + spec.get("env", []):
            env[entry["name"]] = entry["value"]
        runtime = (
            spec["runtimeClassName"]
            if "runtimeClassName" in spec
            else engine.get("runtimeClassName")
        )
        has_shm = "tensorParallelSize" in (spec.get("vllmConfig") or {})
        pods.append(
            EnginePod(
                spec=spec,
                runtime_class=runtime or None,
                env=env,
                mounts=mounts,
                shm_size_limit=(spec.get("shmSize") or "20Gi") if has_shm else None,
            )
        )
    return pods


def claims(chart: dict[str, Any]) -> dict[str, Claim]:
    pods = engine_pods(chart)
    found = {}
    for pod in pods:
        name = _model_claim(pod.spec)
        if name:
            found[name] = Claim(
                name,
                tuple(pod.spec.get("pvcAccessMode") or ["ReadWriteOnce"]),
                pod.spec.get("storageClass") if "storageClass" in pod.spec else None,
                pod.spec["replicaCount"],
            )
    shared = _shared_claim(chart)
    if shared:
        storage = chart["sharedPvcStorage"]
        found[shared] = Claim(
            shared,
            tuple(storage["accessModes"]),
            storage.get("storageClass") or None,
            sum(p.spec["replicaCount"] for p in pods),
        )
    return found


def engine_strategy(chart: dict[str, Any]) -> dict[str, Any]:
    return chart["servingEngineSpec"].get("strategy") or {
        "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}
    }


def probe_window(probe: dict[str, Any]) -> int:
    """Seconds before a probe that never passes gives up (the template's defaults: 15, 10, 3)."""
    delay = probe.get("initialDelaySeconds") or 15
    period = probe.get("periodSeconds") or 10
    return delay + period * (probe.get("failureThreshold") or 3)


def on_claim(path: str, pod: EnginePod) -> str | None:
    """The claim ``path`` lies on in ``pod``, if any."""
    for mount, claim in sorted(pod.mounts.items(), key=lambda m: -len(m[0])):
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return claim
    return None

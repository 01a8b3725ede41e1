"""Which image tags an inventory deploys (what `make lock-images` resolves and locks)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from servekit.images import vllm_version
from servekit.images.tags import TagError, inventory_image_tags

ROOT = Path(__file__).resolve().parents[2]
VLLM = f"docker.io/vllm/vllm-openai:v{vllm_version(ROOT)}"
DCGM = "nvcr.io/nvidia/k8s/dcgm-exporter:4.4.1-4.5.2-ubuntu22.04"


def inventory(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hosts.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_example_site_deploys_the_official_image_of_the_pinned_release():
    tags = inventory_image_tags(ROOT / "inventory" / "example" / "hosts.yml", ROOT)
    assert tags == {VLLM: ["gpu-01", "gpu-02"]}


def test_monitored_gpu_hosts_add_the_dcgm_exporter_and_hand_pins_need_no_entry(tmp_path):
    path = inventory(
        tmp_path,
        f"""
        all:
          children:
            gpu_hosts:
              hosts:
                gpu-1: {{}}
                cpu-1: {{servekit_accelerator: cpu}}
                pinned-1:
                  vllm_service_image: registry.lan/vllm@sha256:{"a" * 64}
                  monitoring_dcgm_exporter_image: registry.lan/dcgm@sha256:{"b" * 64}
                other-1: {{vllm_service_image_tag: v0.31.0}}
            monitoring:
              hosts:
                prom-1: {{}}
        """,
    )
    assert inventory_image_tags(path, ROOT) == {
        VLLM: ["gpu-1", "cpu-1"],
        DCGM: ["gpu-1", "other-1"],
        "docker.io/vllm/vllm-openai:v0.31.0": ["other-1"],
    }


def test_a_template_cannot_be_resolved_without_ansible(tmp_path):
    path = inventory(
        tmp_path,
        """
        all:
          children:
            gpu_hosts:
              hosts:
                gpu-1: {vllm_service_image_repository: "{{ site_registry }}/vllm"}
        """,
    )
    with pytest.raises(TagError, match="vllm_service_image_repository of gpu-1 is a template"):
        inventory_image_tags(path, ROOT)

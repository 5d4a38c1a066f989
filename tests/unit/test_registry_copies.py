"""The model registry lives in four files, one per way of running the mesh: config/registry.yaml (`make up`),
config/registry.compose.yaml (the GPU compose stack), and the chart's files/models-cpu.yaml and
files/models-gpu.yaml. Every pair is held to what it must share, so an edit to one that forgets another fails
here rather than on a cluster."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COPIES = {
    "local": ROOT / "config" / "registry.yaml",
    "compose": ROOT / "config" / "registry.compose.yaml",
    "chart-cpu": ROOT / "deploy" / "helm" / "inference-mesh" / "files" / "models-cpu.yaml",
    "chart-gpu": ROOT / "deploy" / "helm" / "inference-mesh" / "files" / "models-gpu.yaml",
}
# What a model is, wherever it runs: the same name must mean the same tensors and limits.
CONTRACT = ("kind", "triton_model", "version", "versions", "context_tokens", "max_output_tokens", "dimension",
            "max_batch_size", "routing", "semantic_cache")


def _models(name: str) -> dict:
    return yaml.safe_load(COPIES[name].read_text())["models"]


def _on_cpu(models: dict) -> dict:
    """The models with a cpu placement, with only that placement."""
    kept = {}
    for name, model in models.items():
        pools = [p for p in model["pools"] if p["pool"] == "cpu"]
        if pools:
            kept[name] = {**model, "pools": pools}
    return kept


@pytest.mark.parametrize(("one", "other"), list(itertools.combinations(COPIES, 2)))
def test_a_model_means_the_same_in_every_copy(one, other):
    first, second = _models(one), _models(other)
    for name in set(first) & set(second):
        differing = {key: (first[name].get(key), second[name].get(key)) for key in CONTRACT
                     if first[name].get(key) != second[name].get(key)}
        assert not differing, f"{name}: {one} and {other} differ in {differing}"


def test_the_charts_cpu_models_are_the_local_registrys_cpu_placements():
    assert _models("chart-cpu") == _on_cpu(_models("local"))


def test_the_charts_gpu_models_are_the_compose_registrys():
    compose = yaml.safe_load(COPIES["compose"].read_text())
    chart = yaml.safe_load(COPIES["chart-gpu"].read_text())
    assert chart == {"models": compose["models"], "groups": compose["groups"]}


def test_every_model_the_local_registry_serves_is_in_compose():
    # compose adds the TensorRT-LLM models; it drops none of the CPU ones (its cpu profile runs them).
    assert set(_models("local")) <= set(_models("compose"))

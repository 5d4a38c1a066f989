"""The router's registry (services/router/registry.py)."""

from __future__ import annotations

import pytest

from services.router.registry import Registry
from tests.unit.router import REGISTRY


def test_registry_rejects_unknown_pools_and_duplicate_replicas():
    bad = {**REGISTRY, "models": {"m": {"kind": "embed", "triton_model": "x", "pools": ["h100"]}}}
    with pytest.raises(ValueError, match="unknown pools"):
        Registry.model_validate(bad)
    dup = {"pools": {"cpu": {"replicas": [{"name": "a", "grpc": "x:1"}, {"name": "a", "grpc": "x:2"}]}},
           "models": {}}
    with pytest.raises(ValueError, match="unique"):
        Registry.model_validate(dup)


def test_registry_placements_versions_and_groups():
    registry = Registry.model_validate({**REGISTRY, "models": {
        "small": {"kind": "generate", "triton_model": "s", "versions": {"1": 95, "2": 5},
                  "pools": [{"pool": "a100", "cost_per_1k_tokens": 0.02, "latency_class": "interactive"}, "cpu"]},
        "big": {"kind": "generate", "triton_model": "b", "pools": ["a100"]}},
        "groups": {"auto": {"small": "small", "large": "big", "large_above_prompt_chars": 2000}}})
    info = registry.model_info("small", ready=True)
    assert [(p.pool, p.gpu_class, p.latency_class) for p in info.placements] == [
        ("a100", "a100", "interactive"), ("cpu", "cpu", "standard")]
    assert dict(info.version_weights) == {"1": 95, "2": 5}
    assert registry.group_info("auto").large == "big"
    with pytest.raises(ValueError, match="not a generate model"):
        Registry.model_validate({**REGISTRY, "groups": {"g": {"small": "llm", "large": "nope"}}})

"""The router's replica set (services/router/replicas.py)."""

from __future__ import annotations

from services.router.registry import Registry
from services.router.replicas import ReplicaSet
from tests.unit.router import REGISTRY


async def test_registry_sync_keeps_replicas_with_their_work_and_retires_the_rest():
    registry = Registry.model_validate(REGISTRY)
    replicas = ReplicaSet(registry)
    kept = replicas.get("c0")
    kept.in_flight, kept.draining = 2, True
    changed = Registry.model_validate({**REGISTRY, "pools": {
        "a100": {"gpu_class": "a100", "replicas": [{"name": "g0", "grpc": "127.0.0.1:9"}]},
        "cpu": {"gpu_class": "cpu", "replicas": [{"name": "c0", "grpc": "127.0.0.1:2"}]}}})
    retired = replicas.sync(changed)
    assert replicas.get("c0") is kept and kept.in_flight == 2 and kept.draining, "same replica, same state"
    assert sorted(r.name for r in retired) == ["c1", "g0"], "removed, and g0 moved to a new endpoint"
    assert replicas.get("g0").endpoint == "127.0.0.1:9"
    for replica in retired:
        await replica.channel.close()
    await replicas.close()

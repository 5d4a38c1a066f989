"""The router's balancer (services/router/balancer.py): pools, least outstanding, affinity, bounds."""

from __future__ import annotations

from collections import Counter

import pytest

from services.router.balancer import AtCapacityError, Balancer, BalancerSettings, NoReplicaError, Route
from services.router.registry import Registry
from services.router.replicas import ReplicaSet
from tests.unit.router import REGISTRY


async def test_balancer_prefers_pool_order_then_least_outstanding():
    registry = Registry.model_validate(REGISTRY)
    replicas = ReplicaSet(registry)
    by_name = {r.name: r for r in replicas.replicas}
    balancer = Balancer(replicas)
    model = registry.models["llm"]
    with pytest.raises(NoReplicaError):
        balancer.choose(model)
    by_name["c0"].ready_models = {"llm_t"}
    by_name["c1"].ready_models = {"llm_t"}
    by_name["c0"].in_flight = 3
    assert balancer.choose(model).name == "c1"
    by_name["c1"].in_flight = 5
    assert balancer.choose(model).name == "c0"
    by_name["g0"].ready_models = {"llm_t"}
    by_name["g0"].in_flight = 50
    assert balancer.choose(model).name == "g0", "the preferred pool wins while it has a ready replica"
    assert balancer.choose(model, Route(exclude=frozenset({"g0"}))).name == "c0"
    by_name["c0"].in_flight = by_name["c1"].in_flight = 0
    by_name["g0"].ready_models = set()
    assert {balancer.choose(model).name for _ in range(4)} == {"c0", "c1"}, "ties take turns"
    by_name["c0"].draining = True
    assert {balancer.choose(model).name for _ in range(4)} == {"c1"}, "a drained replica gets nothing new"
    await replicas.close()


async def test_prefix_affinity_stays_home_until_the_load_bound_then_spills():
    registry = Registry.model_validate({**REGISTRY, "models": {"llm": {
        "kind": "generate", "triton_model": "llm_t", "pools": ["cpu"], "routing": "prefix_affinity"}}})
    replicas = ReplicaSet(registry)
    for replica in replicas.replicas:
        replica.ready_models = {"llm_t"}
    balancer = Balancer(replicas, BalancerSettings(affinity_load_factor=1.25))
    model = registry.models["llm"]
    route = Route(affinity_key="system-prompt-of-tenant-1")
    home = balancer.choose(model, route)
    assert all(balancer.choose(model, route) is home for _ in range(20)), "same key, idle pool: same replica"
    other = next(r for r in replicas.in_pool("cpu") if r is not home)
    placed = []
    for _ in range(6):
        chosen = balancer.choose(model, route)
        chosen.in_flight += 1
        placed.append(chosen.name)
    assert placed[:2] == [home.name, home.name] and other.name in placed, placed
    assert max(placed.count(home.name), placed.count(other.name)) <= 4, "bounded: one key cannot take everything"
    for replica in replicas.replicas:
        replica.in_flight = 0
    homes = Counter(balancer.choose(model, Route(affinity_key=f"tenant-{i}")).name for i in range(8))
    assert homes == {"c0": 4, "c1": 4}, f"8 new keys split evenly, whatever the hash says: {homes}"
    assert all(balancer.choose(model, Route(affinity_key=f"tenant-{i}")).name ==
               balancer.choose(model, Route(affinity_key=f"tenant-{i}")).name for i in range(8)), "and they stay"
    await replicas.close()


async def test_replicas_at_their_in_flight_bound_are_skipped_then_shed():
    registry = Registry.model_validate({**REGISTRY, "models": {"llm": {
        "kind": "generate", "triton_model": "llm_t", "pools": ["cpu"]}}})
    replicas = ReplicaSet(registry)
    for replica in replicas.replicas:
        replica.ready_models = {"llm_t"}
    balancer = Balancer(replicas, BalancerSettings(max_in_flight_per_replica=2))
    model = registry.models["llm"]
    replicas.get("c0").in_flight = 2
    assert {balancer.choose(model).name for _ in range(4)} == {"c1"}
    replicas.get("c1").in_flight = 2
    with pytest.raises(AtCapacityError, match="2 requests in flight"):
        balancer.choose(model)
    await replicas.close()


async def test_a_refusal_names_the_bound_that_applied():
    """The LLM's pool bound (1 a replica) refused it while the router-wide bound (64) had room: the message
    named 64."""
    registry = Registry.model_validate({**REGISTRY, "models": {"llm": {
        "kind": "generate", "triton_model": "llm_t", "pools": [{"pool": "cpu", "max_in_flight_per_replica": 1}]}}})
    replicas = ReplicaSet(registry)
    for replica in replicas.replicas:
        replica.ready_models = {"llm_t"}
        replica.in_flight_by_model["llm_t"] = 1
        replica.in_flight = 1
    balancer = Balancer(replicas, BalancerSettings(max_in_flight_per_replica=64))
    with pytest.raises(AtCapacityError) as refused:
        balancer.choose(registry.models["llm"])
    assert "1 of this model in flight per replica, its bound in pool cpu" in str(refused.value)
    assert "64" not in str(refused.value)
    await replicas.close()


async def test_free_slots_count_what_the_bounds_leave_and_an_unbounded_pool_has_plenty():
    registry = Registry.model_validate({**REGISTRY, "models": {
        "llm": {"kind": "generate", "triton_model": "llm_t",
                "pools": [{"pool": "cpu", "max_in_flight_per_replica": 2}]},
        "free": {"kind": "generate", "triton_model": "llm_t", "pools": ["cpu"]}}})
    replicas = ReplicaSet(registry)
    c0, c1 = replicas.in_pool("cpu")[:2]
    for replica in (c0, c1):
        replica.ready_models = {"llm_t"}
    c0.in_flight_by_model["llm_t"] = c0.in_flight = 2
    c1.in_flight_by_model["llm_t"] = c1.in_flight = 1
    assert Balancer(replicas).free_slots(registry.models["llm"]) == 1
    assert Balancer(replicas, BalancerSettings(max_in_flight_per_replica=1)).free_slots(registry.models["llm"]) == 0
    assert Balancer(replicas).free_slots(registry.models["free"]) > 1000
    await replicas.close()


async def test_a_needed_capability_leaves_only_the_placements_that_declare_it():
    registry = Registry.model_validate({**REGISTRY, "models": {"llm": {
        "kind": "generate", "triton_model": "llm_t",
        "pools": ["a100", {"pool": "cpu", "supports": ["structured_output"]}]}}})
    replicas = ReplicaSet(registry)
    for replica in replicas.replicas:
        replica.ready_models = {"llm_t"}
    balancer = Balancer(replicas)
    model = registry.models["llm"]
    assert balancer.choose(model).name == "g0", "free text: the preferred pool"
    needs = frozenset({"structured_output"})
    assert {balancer.choose(model, Route(needs=needs)).name for _ in range(4)} == {"c0", "c1"}
    assert model.pools_supporting(needs) == ["cpu"]
    assert Route(needs=needs).excluding("c0").needs == needs, "a retry keeps what the request needs"
    for replica in replicas.in_pool("cpu"):
        replica.ready_models = set()
    with pytest.raises(NoReplicaError):
        balancer.choose(model, Route(needs=needs))
    await replicas.close()

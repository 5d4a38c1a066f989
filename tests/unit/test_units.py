"""Pure unit tests: no servers."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.common.errors import from_stream_error
from services.common.kserve import InferRequestBuilder, output_arrays
from services.common.tenants import Tenant, TenantConfig, Tier, hash_key
from services.gateway.auth import Authenticator
from services.gateway.settings import RequestLimits
from services.gateway.validation import check_embed, check_generate
from services.router.balancer import AtCapacityError, Balancer, BalancerSettings, NoReplicaError, Route
from services.router.canary import choose_version
from services.router.queue_metrics import parse, update
from services.router.registry import Registry
from services.router.replicas import ReplicaSet

ROOT = Path(__file__).resolve().parents[2]


def _load_stop_matcher():
    spec = importlib.util.spec_from_file_location("stop_matcher", ROOT / "triton_models/smollm2/1/stop_matcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StopMatcher


StopMatcher = _load_stop_matcher()


def feed_all(matcher, pieces: list[str]) -> str:
    out = ""
    for piece in pieces:
        out += matcher.feed(piece)
        if matcher.stopped:
            return out
    return out + matcher.flush()


@pytest.mark.parametrize(("pieces", "stops", "expected", "stopped"), [
    (["Hello", " wor", "ld"], [], "Hello world", False),
    (["one,", " two"], [","], "one", True),
    (["abc", "EN", "D tail"], ["END"], "abc", True),
    (["abc", "EN", "x"], ["END"], "abcENx", False),          # a partial match is released once it cannot match
    (["a", "b"], ["bc"], "ab", False),                        # held-back text is flushed at the end
    (["x<|", "stop|>y"], ["<|stop|>"], "x", True),
])
def test_stop_matcher(pieces, stops, expected, stopped):
    matcher = StopMatcher(stops)
    assert feed_all(matcher, pieces) == expected
    assert matcher.stopped is stopped


def test_stop_matcher_never_releases_a_prefix_of_a_stop():
    matcher = StopMatcher(["###"])
    assert matcher.feed("text #") == "text "
    assert matcher.feed("#") == ""
    assert matcher.feed("#") == "" and matcher.stopped


REGISTRY = {
    "pools": {"a100": {"gpu_class": "a100", "replicas": [{"name": "g0", "grpc": "127.0.0.1:1"}]},
              "cpu": {"gpu_class": "cpu", "replicas": [{"name": "c0", "grpc": "127.0.0.1:2"},
                                                       {"name": "c1", "grpc": "127.0.0.1:3"}]}},
    "models": {"llm": {"kind": "generate", "triton_model": "llm_t", "pools": ["a100", "cpu"], "max_output_tokens": 64}},
}


def test_registry_rejects_unknown_pools_and_duplicate_replicas():
    bad = {**REGISTRY, "models": {"m": {"kind": "embed", "triton_model": "x", "pools": ["h100"]}}}
    with pytest.raises(ValueError, match="unknown pools"):
        Registry.model_validate(bad)
    dup = {"pools": {"cpu": {"replicas": [{"name": "a", "grpc": "x:1"}, {"name": "a", "grpc": "x:2"}]}},
           "models": {}}
    with pytest.raises(ValueError, match="unique"):
        Registry.model_validate(dup)


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


def test_canary_weights_are_sticky_and_proportional():
    weights = {"1": 80, "2": 20}
    picks = [choose_version("m", weights, f"session-{i}") for i in range(10_000)]
    share = picks.count("2") / len(picks)
    assert abs(share - 0.20) < 4 * (0.2 * 0.8 / len(picks)) ** 0.5, share
    assert {choose_version("m", weights, "tenant-x") for _ in range(50)} == {choose_version("m", weights, "tenant-x")}
    moved = sum(choose_version("m", weights, f"session-{i}") != choose_version("m", {"1": 70, "2": 30},
                                                                               f"session-{i}") for i in range(10_000))
    assert 0.07 < moved / 10_000 < 0.13, "raising the canary 20 -> 30 moves only about 10% of the callers"
    assert choose_version("m", {}, "k", default="3") == "3"


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


def test_queue_metrics_are_parsed_and_turned_into_load():
    registry = Registry.model_validate(REGISTRY)
    replica = ReplicaSet(registry).replicas[1]
    text = ('nv_inference_pending_request_count{model="llm_t",version="1"} 3\n'
            'nv_inference_queue_duration_us{model="llm_t",version="1"} 1000000\n'
            'nv_inference_request_success{model="llm_t",version="1"} 10\n'
            'nv_inference_queue_duration_us{model="other",version="1"} 5\n')
    update(replica, parse(text))
    text2 = text.replace("} 1000000", "} 1400000").replace("} 10\n", "} 14\n").replace("} 3\n", "} 1\n")
    update(replica, parse(text2))
    queue = replica.queues["llm_t"]
    assert queue.pending == 1 and queue.queue_ms == 100.0, queue
    replica.in_flight = 2
    assert replica.load("llm_t", queue_ms_per_slot=50.0) == 2 + 2.0
    update(replica, parse(text2))
    assert replica.queues["llm_t"].queue_ms == 100.0, "requests waiting, none finished: the last mean stands"
    update(replica, parse(text2.replace("} 1\n", "} 0\n")))
    assert replica.queues["llm_t"].queue_ms == 0.0, "nothing waiting: no queue"


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


def test_api_keys_are_matched_by_hash():
    config = TenantConfig(tiers={"standard": Tier(requests_per_minute=300, burst=30)},
                          tenants=[Tenant(id="acme", tier="standard", api_key_sha256=[hash_key("s3cret")])])
    auth = Authenticator(config)
    assert auth.identify((("authorization", "Bearer s3cret"),))[0].tenant == "acme"
    assert auth.identify((("x-api-key", "s3cret"),))[0].tenant == "acme"
    assert auth.identify((("authorization", "bearer s3cret"),))[0].tenant == "acme"
    assert auth.identify((("x-api-key", "S3CRET"),)) == (None, "invalid API key")
    assert auth.identify(())[0] is None and "missing credentials" in auth.identify(())[1]
    assert "s3cret" not in repr(config)


def test_jwt_tenant_is_trusted_only_with_the_edge_secret():
    config = TenantConfig(tiers={"standard": Tier(requests_per_minute=300, burst=30)},
                          tenants=[Tenant(id="acme", tier="standard"), Tenant(id="other", tier="standard")])
    auth = Authenticator(config, edge_secret="edge-s3cret")
    claim = ("x-mesh-jwt-tenant", "acme")
    assert auth.identify((claim, ("x-mesh-edge-secret", "edge-s3cret")))[0].tenant == "acme"
    assert auth.identify((claim,))[0] is None, "a client cannot name its tenant without the edge"
    assert auth.identify((claim, ("x-mesh-edge-secret", "guess")))[0] is None
    unknown = auth.identify((("x-mesh-jwt-tenant", "nobody"), ("x-mesh-edge-secret", "edge-s3cret")))
    assert unknown[0] is None and "no configured tenant" in unknown[1]
    assert Authenticator(config).identify((claim, ("x-mesh-edge-secret", "")))[0] is None, "no secret, no trust"


def test_validation_limits():
    limits = RequestLimits()
    model = models_pb2.ModelInfo(name="llm", max_output_tokens=64)
    ok = mesh_pb2.GenerateRequest(model="llm", max_tokens=64,
                                  messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content="hi")])
    check_generate(ok, model, limits)
    nan = mesh_pb2.GenerateRequest()
    nan.CopyFrom(ok)
    nan.temperature = float("nan")
    with pytest.raises(Exception, match="temperature"):
        check_generate(nan, model, limits)
    check_embed(mesh_pb2.EmbedRequest(model="e", texts=["a"] * limits.max_embed_batch), limits)
    with pytest.raises(Exception, match="the limit is 256"):
        check_embed(mesh_pb2.EmbedRequest(model="e", texts=["a"] * (limits.max_embed_batch + 1)), limits)


def test_stream_errors_map_to_statuses():
    assert from_stream_error("INVALID_ARGUMENT: prompt too long").code == grpc.StatusCode.INVALID_ARGUMENT
    assert from_stream_error("UNAVAILABLE: no ready replica").code == grpc.StatusCode.UNAVAILABLE
    assert from_stream_error("something broke").code == grpc.StatusCode.INTERNAL


def test_kserve_tensors_round_trip():
    request = InferRequestBuilder("m").add_bytes("T", [b"a", b"", "é".encode()]).add_array(
        "N", np.array([[1.5, -2.0]], np.float32)).build()
    response = service_pb2.ModelInferResponse(raw_output_contents=request.raw_input_contents)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    arrays = output_arrays(response)
    assert list(arrays["T"]) == [b"a", b"", "é".encode()]
    np.testing.assert_array_equal(arrays["N"], np.array([[1.5, -2.0]], np.float32))


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


def test_the_canary_version_sticks_to_the_session_else_the_tenant_on_a_retry_and_a_fallback():
    from tritonclient.grpc import service_pb2

    from services.router.inference_service import asked

    without_session = asked(service_pb2.ModelInferRequest(model_name="llm"), "tenant-1").route
    assert without_session.version_key == "tenant-1" and without_session.affinity_key == ""
    assert without_session.excluding("c0").version_key == "tenant-1"  # a retry elsewhere keeps it
    with_session = service_pb2.ModelInferRequest(model_name="llm")
    with_session.parameters["mesh_session"].string_param = "s-9"
    assert asked(with_session, "tenant-1").route.version_key == "s-9"


def test_a_party_holds_at_most_its_share_of_the_places():
    from services.common.shedding import LoadShedder

    shedder = LoadShedder("unit-shares", 8, party_share=0.25, party_of=lambda metadata: dict(metadata).get("t"))
    assert shedder.party((("t", "a"),)) == "a"
    assert shedder.enter("a") and shedder.enter("a")
    assert not shedder.enter("a"), "a third place is past a's share of 2"
    assert "'a' has 2 requests in flight" in shedder.refusal("a")
    assert all(shedder.enter(party) for party in ("b", "b", None, None, None, None))
    assert not shedder.enter("c") and "at capacity (8" in shedder.refusal("c"), "the whole bound still applies"
    shedder.release("a")
    assert shedder.enter("a"), "a released place can be taken again"
    for party in ("a", "a", "b", "b", None, None, None, None):
        shedder.release(party)
    assert shedder.in_flight == 0 and not shedder._held


def test_make_up_runs_internal_mtls_unless_told_otherwise():
    from tools.stack import arguments, local_stack

    assert local_stack(arguments(["up"])).internal_tls
    assert not local_stack(arguments(["up", "--plaintext-internal"])).internal_tls

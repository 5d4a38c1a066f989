"""The orchestration's decisions, in process against fakes of the gRPC stubs (tests/unit/fakes.py): what the
gateway does with a cache lease when a generation completes, fails or is abandoned; how the router resumes a
stream on another replica and places a fallback, and when it must refuse to."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import cache_pb2, mesh_pb2, models_pb2
from services.common.errors import MeshError
from services.common.resilience import ResilienceSettings
from services.common.stream_progress import RESUME_INPUT
from services.common.wire import SESSION_PARAMETER
from services.gateway import cached_generation
from services.gateway.auth import Caller
from services.gateway.generation import RouterRelayed
from services.gateway.plan import plan_request
from services.router.balancer import Balancer
from services.router.canary import choose_version
from services.router.coalescing import Outbox
from services.router.inference_service import RoutingInferenceService
from services.router.registry import Registry
from services.router.replicas import ReplicaSet
from services.router.settings import RouterSettings
from services.router.state import RouterState
from tests.unit.fakes import (
    FakeContext,
    RecordingCache,
    ScriptedCall,
    ScriptedStreams,
    rpc_error,
    token,
)
from tools.stack import ROOT

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
MODEL = models_pb2.ModelInfo(name="llm", kind=models_pb2.MODEL_KIND_GENERATE, version="1", max_output_tokens=64)
GREEDY = mesh_pb2.GenerateRequest(model="llm", max_tokens=8, temperature=0.0,
                                  messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content="hi")])
MISS = cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_MISS, lease="lease-1")


def _complete() -> ScriptedCall:
    return ScriptedCall([token("Hel", 1, 11), token("lo", 2, 12), token("", 2, finish="stop")])


def _plan():
    return plan_request(Caller("tenant-1", "standard"), MODEL, "req-1", timeout_s=5.0)


async def _drain(chunks, stop_after: int | None = None) -> list[mesh_pb2.GenerateChunk]:
    seen = []
    async for chunk in chunks:
        seen.append(chunk)
        if stop_after is not None and len(seen) == stop_after:
            await chunks.aclose()  # the caller went away
            break
    await asyncio.sleep(0)
    return seen


def test_a_completed_generation_is_stored_under_its_lease():
    cache, router = RecordingCache(MISS), ScriptedStreams([_complete()])
    chunks = asyncio.run(_drain(cached_generation.generate(cache, RouterRelayed(router), GREEDY, _plan())))
    assert "".join(c.text for c in chunks) == "Hello" and chunks[-1].finish_reason == mesh_pb2.FINISH_REASON_STOP
    assert [s.lease for s in cache.stored] == ["lease-1"] and not cache.released
    assert list(cache.stored[0].response.chunks) == ["Hel", "lo", ""]  # the last chunk, as streamed
    assert cache.stored[0].scope.model_version == "1"


def test_an_abandoned_generation_gives_its_lease_back_and_cancels_the_router_call():
    cache, router = RecordingCache(MISS), ScriptedStreams([_complete()])
    generation = cached_generation.generate(cache, RouterRelayed(router), GREEDY, _plan())
    chunks = asyncio.run(_drain(generation, stop_after=1))
    assert [c.text for c in chunks] == ["Hel"]
    assert [r.lease for r in cache.released] == ["lease-1"] and not cache.stored
    assert router.made[0].cancelled, "the Triton request must not run on for nobody"


def test_a_failure_after_text_is_not_retried_and_gives_the_lease_back():
    failing = ScriptedCall([token("Hel", 1, 11)], fails_with=rpc_error(UNAVAILABLE, "replica died"))
    cache, router = RecordingCache(MISS), ScriptedStreams([failing, _complete()])
    retrier = ResilienceSettings().retrier("router-streams")
    with pytest.raises(MeshError) as failed:
        asyncio.run(_drain(cached_generation.generate(cache, RouterRelayed(router, retrier), GREEDY, _plan())))
    assert failed.value.code == UNAVAILABLE
    assert len(router.made) == 1, "text was sent: only the router may continue the stream"
    assert [r.lease for r in cache.released] == ["lease-1"] and not cache.stored


def test_a_router_unreachable_before_any_text_is_tried_again():
    refused = ScriptedCall([], fails_with=rpc_error(UNAVAILABLE, "connection refused"))
    cache, router = RecordingCache(MISS), ScriptedStreams([refused, _complete()])
    retrier = ResilienceSettings().retrier("router-streams")
    chunks = asyncio.run(_drain(cached_generation.generate(cache, RouterRelayed(router, retrier), GREEDY, _plan())))
    assert "".join(c.text for c in chunks) == "Hello" and len(router.made) == 2
    assert len(cache.stored) == 1


def test_a_cache_hit_replays_without_calling_the_router():
    hit = cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_EXACT_HIT, response=cache_pb2.CachedResponse(
        chunks=["Hel", "lo"], token_indices=[0, 1], prompt_tokens=3, completion_tokens=2,
        finish_reason=mesh_pb2.FINISH_REASON_STOP, pool="cpu", replica="c0"))
    cache, router = RecordingCache(hit), ScriptedStreams([])
    plan = _plan()
    chunks = asyncio.run(_drain(cached_generation.generate(cache, RouterRelayed(router), GREEDY, plan)))
    assert "".join(c.text for c in chunks) == "Hello" and not router.made
    assert plan.metadata.cache_status == mesh_pb2.CACHE_STATUS_EXACT_HIT and chunks[-1].usage.total_tokens == 5
    assert len(chunks) == 1 and chunks[0].token_index == 1 and chunks[0].finish_reason == mesh_pb2.FINISH_REASON_STOP


def test_an_exact_hit_read_directly_skips_the_cache_service_and_the_router():
    cached = cache_pb2.CachedResponse(chunks=["Hi", "!"], token_indices=[0, 1], prompt_tokens=3, completion_tokens=2,
                                      finish_reason=mesh_pb2.FINISH_REASON_STOP, pool="cpu", replica="c1")
    cache, router = RecordingCache(reply=None, direct=cached), ScriptedStreams([])
    plan = _plan()
    chunks = asyncio.run(_drain(cached_generation.generate(cache, RouterRelayed(router), GREEDY, plan)))
    assert [c.text for c in chunks] == ["Hi!"] and not router.made and not cache.looked_up
    assert plan.metadata.cache_status == mesh_pb2.CACHE_STATUS_EXACT_HIT and plan.metadata.replica == "c1"


def test_a_refresh_never_reads_the_entry_it_replaces():
    cached = cache_pb2.CachedResponse(chunks=["old"], token_indices=[0], finish_reason=mesh_pb2.FINISH_REASON_STOP)
    miss = cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_MISS, lease="l1")
    cache = RecordingCache(reply=miss, direct=cached)
    router = ScriptedStreams([ScriptedCall([token("new", 1, 11), token("", 1, finish="stop")])])
    refresh = mesh_pb2.GenerateRequest()
    refresh.CopyFrom(GREEDY)
    refresh.cache_mode = mesh_pb2.CACHE_MODE_REFRESH
    chunks = asyncio.run(_drain(cached_generation.generate(cache, RouterRelayed(router), refresh, _plan())))
    assert "".join(c.text for c in chunks) == "new" and cache.looked_up


# The router: two cpu replicas for `llm`; `llm` falls back to `backup` (a canary split) on the a100 pool.
REGISTRY = {
    "pools": {"a100": {"gpu_class": "a100", "replicas": [{"name": "g0", "grpc": "127.0.0.1:1"}]},
              "cpu": {"gpu_class": "cpu", "replicas": [{"name": "c0", "grpc": "127.0.0.1:2"},
                                                       {"name": "c1", "grpc": "127.0.0.1:3"}]}},
    "models": {"llm": {"kind": "generate", "triton_model": "llm_t", "version": "1", "pools": ["cpu"],
                       "fallback": "backup"},
               "backup": {"kind": "generate", "triton_model": "backup_t", "versions": {"1": 50, "2": 50},
                          "pools": ["a100"]}},
}


def _router(streams: ScriptedStreams, ready: dict[str, set[str]]) -> tuple[RoutingInferenceService, ReplicaSet]:
    registry = Registry.model_validate(REGISTRY)
    replicas = ReplicaSet(registry)
    for replica in replicas.replicas:
        replica.ready_models = ready.get(replica.name, set())
        replica.stub = streams.for_replica(replica.name)
    settings = RouterSettings(resilience=ResilienceSettings(retry_base_backoff_s=0.001, retry_max_backoff_s=0.002))
    service = RoutingInferenceService(RouterState(None, registry, replicas), Balancer(replicas), settings,
                                      settings.resilience.retrier("replicas"))
    return service, replicas


def _stream_request(session: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="llm", id="req-1")
    if session:
        request.parameters[SESSION_PARAMETER].string_param = session
    return request


async def _relay(service: RoutingInferenceService, request, tenant: str = "tenant-1"):
    out: asyncio.Queue = asyncio.Queue()
    await service._relay_stream(request, FakeContext(tenant), Outbox(out, 0))
    return [out.get_nowait()[1] for _ in range(out.qsize())]


async def test_a_stream_that_loses_its_replica_resumes_on_another_from_the_tokens_sent():
    died = ScriptedCall([token("Hel", 1, 11), token("lo", 2, 12)], fails_with=rpc_error(UNAVAILABLE, "gone"))
    rest = ScriptedCall([token(" you", 3, 13), token("", 3, finish="stop")])
    streams = ScriptedStreams([died, rest])
    service, replicas = _router(streams, {"c0": {"llm_t"}, "c1": {"llm_t"}})
    sent = await _relay(service, _stream_request())
    assert streams.replicas[0] != streams.replicas[1], "the resumed part runs elsewhere"
    resumed = streams.made[1].request
    tensor = next(i for i, t in enumerate(resumed.inputs) if t.name == RESUME_INPUT)
    assert list(resumed.inputs[tensor].shape) == [2] and resumed.raw_input_contents[tensor] == \
        bytes([11, 0, 0, 0, 12, 0, 0, 0])
    assert not any(item.error_message for item in sent) and len(sent) == 4
    final = sent[-1].infer_response
    assert final.model_name == "llm", "the caller sees the name it asked for"
    assert final.parameters["mesh_resumed"].int64_param == 1
    assert final.parameters["mesh_replica"].string_param == streams.replicas[1]
    await replicas.close()


async def test_a_replica_that_cancels_a_stream_is_failed_over_like_one_that_went_away():
    # CANCELLED from a replica is the replica's side going away (the router's caller leaving raises
    # CancelledError instead): UNAVAILABLE, tried elsewhere, as the gateway reads its hops.
    cancelled = ScriptedCall([], fails_with=rpc_error(grpc.StatusCode.CANCELLED, "Triton is shutting down"))
    streams = ScriptedStreams([cancelled, _complete()])
    service, replicas = _router(streams, {"c0": {"llm_t"}, "c1": {"llm_t"}})
    sent = await _relay(service, _stream_request())
    assert not any(item.error_message for item in sent) and len(sent) == 3
    assert sent[-1].infer_response.parameters["mesh_retries"].int64_param == 1
    assert replicas.get(streams.replicas[0]).breaker._cb.fail_counter == 1, "counted against the replica"
    await replicas.close()


async def test_a_stream_is_not_continued_by_a_different_model():
    died = ScriptedCall([token("Hel", 1, 11)], fails_with=rpc_error(UNAVAILABLE, "gone"))
    streams = ScriptedStreams([died])
    # Only one replica of llm; the fallback model is ready, but it cannot continue llm's text.
    service, replicas = _router(streams, {"c0": {"llm_t"}, "g0": {"backup_t"}})
    sent = await _relay(service, _stream_request())
    assert len(streams.made) == 1
    assert sent[-1].error_message == ("UNAVAILABLE: no other replica of 'llm_t' can continue the stream "
                                      "(after 1 responses were sent)")
    await replicas.close()


async def test_the_fallback_models_version_sticks_to_the_session_else_the_tenant():
    streams = ScriptedStreams([])
    service, replicas = _router(streams, {"g0": {"backup_t"}})  # llm's own pool is down
    stub = replicas.get("g0").stub
    weights = REGISTRY["models"]["backup"]["versions"]
    for tenant in (f"tenant-{i}" for i in range(12)):
        for _ in range(2):
            answer = await service.ModelInfer(service_pb2.ModelInferRequest(model_name="llm"), FakeContext(tenant))
            assert answer.model_name == "llm" and answer.parameters["mesh_fallback"].string_param == \
                "model llm->backup"
        expected = choose_version("backup", weights, tenant, "")
        assert [(r.model_name, r.model_version) for r in stub.unary[-2:]] == [("backup_t", expected)] * 2
    assert {r.model_version for r in stub.unary} == {"1", "2"}, "12 tenants over a 50/50 split see both versions"
    sessioned = _stream_request("session-7")
    await service.ModelInfer(sessioned, FakeContext("tenant-0"))
    assert stub.unary[-1].model_version == choose_version("backup", weights, "session-7", "")
    await replicas.close()


def test_a_model_queue_estimates_with_the_spec_of_the_latest_registry():
    """After a reload the queue must count the new placement's slots, not those of the spec it was made with."""
    service, _ = _router(ScriptedStreams([]), {"c0": {"llm_t"}, "c1": {"llm_t"}})
    spec = Registry.model_validate(REGISTRY).models["llm"]
    queue = service.admission(spec)
    assert queue._slots() == 2, "two ready cpu replicas, one slot each"
    reloaded = spec.model_copy(update={"pools": [spec.pools[0].model_copy(update={"max_in_flight_per_replica": 4})]})
    assert service.admission(reloaded) is queue and queue._slots() == 8


def test_semantic_hits_are_opt_in_per_model():
    from services.router.registry import Registry

    registry = Registry.load(ROOT / "config" / "registry.yaml")
    generation = [name for name, spec in registry.models.items() if spec.kind == "generate"]
    assert generation and not any(registry.model_info(name, True).semantic_cache for name in generation), \
        "every shipped registry leaves semantic hits off until a held-out measurement meets the budget"
    opted = registry.models[generation[0]].model_copy(update={"semantic_cache": True})
    registry.models[generation[0]] = opted
    assert registry.model_info(generation[0], True).semantic_cache


def test_the_gateway_asks_for_a_semantic_hit_only_for_an_opted_in_model():
    for opted_in in (False, True):
        model = models_pb2.ModelInfo()
        model.CopyFrom(MODEL)
        model.semantic_cache = opted_in
        cache, router = RecordingCache(MISS), ScriptedStreams([_complete()])
        plan = plan_request(Caller("tenant-1", "standard"), model, "req-1", timeout_s=5.0)
        asyncio.run(_drain(cached_generation.generate(cache, RouterRelayed(router), GREEDY, plan)))
        assert [asked.semantic for asked in cache.asked] == [opted_in]
        assert [stored.semantic for stored in cache.stored] == [opted_in], "a semantic row only where one may answer"

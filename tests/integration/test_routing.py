"""Model-aware routing on two real Triton replicas: canary weights and stickiness, reload, drain, queue-aware and
prefix-affinity choice, cascades."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from services.common.kserve import InferRequestBuilder, is_final_response
from services.router.canary import choose_version
from tests.conftest import AUTH, EMBEDDER, LLM, chat, triton_metric
from tools.stack import ROOT, LocalStack, StackPorts

WEIGHTS = {"1": 80, "2": 20}
# A stream that ran to its end (the model's end of text or max_tokens), not one cut off.
COMPLETED = (mesh_pb2.FINISH_REASON_STOP, mesh_pb2.FINISH_REASON_LENGTH)
SYSTEM = ("You are the support assistant of tenant one. Answer politely, cite the handbook, never invent "
          "policies, and keep answers short. ") * 3


def registry_for_tests(path: Path, weights: dict[str, int]) -> Path:
    registry = yaml.safe_load((ROOT / "config" / "registry.yaml").read_text())
    registry["models"][EMBEDDER]["versions"] = weights
    registry["models"]["smollm2-large"] = {**registry["models"][LLM]}
    registry["groups"] = {"chat": {"small": LLM, "large": "smollm2-large", "large_above_prompt_chars": 300}}
    path.write_text(yaml.safe_dump(registry))
    return path


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tenants_file):
    run_dir = tmp_path_factory.mktemp("routing")
    mesh = LocalStack(run_dir, StackPorts.free(2, gateways=1), tenants_file=tenants_file,
                      registry_file=registry_for_tests(run_dir / "registry-base.yaml", WEIGHTS),
                      with_edge=False, with_cache=False, with_retrieval=False)
    mesh.start()
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def admin(routed):
    with grpc.insecure_channel(routed.router_address) as channel:
        yield router_pb2_grpc.RouterAdminStub(channel)


@pytest.fixture(scope="module")
def router(routed):
    with grpc.insecure_channel(routed.router_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def gateway(routed):
    with grpc.insecure_channel(routed.gateway_address) as channel:
        yield mesh_pb2_grpc.InferenceMeshStub(channel)


def embed_request(session: str) -> service_pb2.ModelInferRequest:
    request = InferRequestBuilder(EMBEDDER).add_bytes("TEXT", [b"which version?"], [1, 1]).build()
    request.parameters["mesh_session"].string_param = session
    return request


def served_versions(router, sessions: list[str]) -> list[str]:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: router.ModelInfer(embed_request(s), timeout=30), sessions))
    return [a.model_version for a in answers]


def generate(gateway, request, metadata=AUTH) -> list[mesh_pb2.GenerateChunk]:
    return list(gateway.Generate(request, metadata=metadata, timeout=120))


def wait_in_flight(admin, timeout_s: float = 10.0) -> str | None:
    """The replica the router has a request in flight on, once there is one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = next((r.name for r in admin.ListReplicas(router_pb2.ListReplicasRequest(), timeout=5).replicas
                     if r.in_flight), None)
        if busy:
            return busy
        time.sleep(0.05)
    return None


def reload_with(routed, admin, weights: dict[str, int]) -> router_pb2.ReloadReply:
    registry = routed.run_dir / "registry.yaml"
    text = yaml.safe_load(registry.read_text())
    text["models"][EMBEDDER]["versions"] = weights
    registry.write_text(yaml.safe_dump(text))
    return admin.ReloadRegistry(router_pb2.ReloadRequest(), timeout=5)


def test_canary_weights_hold_over_1000_requests(router):
    sessions = [f"session-{i}" for i in range(1000)]
    versions = served_versions(router, sessions)
    assert versions == [choose_version(EMBEDDER, WEIGHTS, s) for s in sessions], "Triton served the routed version"
    share = versions.count("2") / len(versions)
    assert abs(share - 0.20) <= 4 * (0.2 * 0.8 / 1000) ** 0.5, f"version 2 got {share:.1%} of 1000 requests"


def test_a_session_and_a_tenant_stay_on_their_version(router, gateway):
    assert len(set(served_versions(router, ["sticky-session"] * 30))) == 1
    embed = mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["sticky"], cache_mode=mesh_pb2.CACHE_MODE_BYPASS)
    seen = {gateway.Embed(embed, metadata=AUTH, timeout=30).metadata.model_version for _ in range(20)}
    assert seen == {choose_version(EMBEDDER, WEIGHTS, "tenant-a")}


def test_pools_and_replicas_are_listed_with_state_and_load(admin):
    pools = {p.name: p for p in admin.ListPools(router_pb2.ListPoolsRequest(), timeout=5).pools}
    assert pools["cpu"].gpu_class == "cpu" and pools["cpu"].ready_replicas == 2
    assert pools["a100"].gpu_class == "a100" and not pools["a100"].replicas
    models = {m.name: m for m in admin.ListModels(router_pb2.RouterListModelsRequest(), timeout=5).models}
    assert [p.pool for p in models[LLM].placements] == ["a100", "t4", "cpu"]
    assert models[LLM].routing == "prefix_affinity" and dict(models[EMBEDDER].version_weights) == WEIGHTS


def test_cascade_picks_the_small_or_the_large_model(gateway):
    short = generate(gateway, chat("Hi!", max_tokens=2, model="chat"))[-1].metadata
    assert (short.model, short.model_group) == (LLM, "chat")
    high = generate(gateway, chat("Hi!", max_tokens=2, model="chat", quality=mesh_pb2.QUALITY_TIER_HIGH))[-1]
    assert high.metadata.model == "smollm2-large"
    long_prompt = generate(gateway, chat("Summarise: " + "the mesh routes requests. " * 20, max_tokens=2,
                                         model="chat"))[-1]
    assert long_prompt.metadata.model == "smollm2-large"


def _with_system(question: str, max_tokens: int) -> mesh_pb2.GenerateRequest:
    return mesh_pb2.GenerateRequest(model=LLM, max_tokens=max_tokens, temperature=0.0, messages=[
        mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_SYSTEM, content=SYSTEM),
        mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=question)])


def test_affinity_keeps_a_shared_prefix_on_one_replica_until_its_load_bound(routed, gateway):
    reuse_before = {i: triton_metric(routed, "mesh_llm_prefix_reuse_total", i) for i in range(2)}
    homes = {generate(gateway, _with_system(f"Question {i}?", 4))[-1].metadata.replica for i in range(4)}
    assert len(homes) == 1, f"sequential requests with one system prompt went to {homes}"
    home = homes.pop()
    index = int(home.rsplit("-", 1)[1])
    assert triton_metric(routed, "mesh_llm_prefix_reuse_total", index) - reuse_before[index] >= 3, \
        "the home replica reused the prefix's KV"
    with ThreadPoolExecutor(6) as pool:
        placed = Counter(pool.map(lambda i: generate(gateway, _with_system(f"Concurrent {i}?", 24))[-1]
                                  .metadata.replica, range(6)))
    assert len(placed) == 2 and placed[home] >= 2, f"a hot prefix spills past its bound, home first: {placed}"


def _occupy(routed, replica: int, streams: int) -> list[threading.Thread]:
    """Generations sent to one Triton directly, behind the router's back: only Triton's metrics show them."""
    def run() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{routed.ports.tritons[replica].grpc}") as channel:
            request = (InferRequestBuilder("smollm2", version="1")
                       .add_bytes("messages", [b'[{"role": "user", "content": "Count from 1 to 500."}]'])
                       .add_array("max_tokens", np.array([200], dtype=np.int32))
                       .add_array("temperature", np.array([0.0], dtype=np.float32)).build())
            for response in service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                    iter([request]), timeout=120):
                if is_final_response(response.infer_response):
                    break
    threads = [threading.Thread(target=run) for _ in range(streams)]
    for thread in threads:
        thread.start()
    return threads


def test_queue_aware_choice_avoids_a_replica_with_a_triton_queue(routed, admin, gateway):
    # One generation runs, three wait in Triton's queue: only Triton's metrics know (pending requests); a
    # running request shows nowhere, so the test keeps a queue for its whole window.
    threads = _occupy(routed, 0, 4)

    def pending() -> int:
        replicas = {r.name: r for r in admin.ListReplicas(router_pb2.ListReplicasRequest(), timeout=5).replicas}
        return replicas["triton-cpu-0"].triton_pending

    try:
        deadline = time.monotonic() + 10
        while pending() < 2:
            assert time.monotonic() < deadline, "Triton's pending count never showed on the router"
            time.sleep(0.1)
        # No system prompt, no session: no affinity key, so the queue-aware load decides.
        placed, seen = set(), []
        for i in range(4):
            loads = {r.name: (r.load, r.in_flight, r.triton_pending, round(r.queue_ms)) for r in
                     admin.ListReplicas(router_pb2.ListReplicasRequest(), timeout=5).replicas}
            placed.add(generate(gateway, chat(f"Hi {i}", max_tokens=2))[-1].metadata.replica)
            seen.append(loads)
        assert pending() >= 1, "the queue drained during the test: inconclusive"
        assert placed == {"triton-cpu-1"}, (placed, seen)
    finally:
        for thread in threads:
            thread.join()


def test_reload_changes_weights_without_dropping_streams(routed, admin, router, gateway):
    outcome: dict = {}

    def stream() -> None:
        outcome["chunks"] = generate(gateway, chat("Count from 1 to 300.", max_tokens=120, temperature=0.0))

    runner = threading.Thread(target=stream)
    runner.start()
    assert wait_in_flight(admin), "the stream never showed as in flight"
    try:
        reply = reload_with(routed, admin, {"1": 0, "2": 100})
        assert reply.changed and not reply.error
        assert set(served_versions(router, [f"after-{i}" for i in range(20)])) == {"2"}
        runner.join()
        last = outcome["chunks"][-1]
        assert last.finish_reason in COMPLETED and last.usage.completion_tokens > 0, last
        broken = routed.run_dir / "registry.yaml"
        good = broken.read_text()
        broken.write_text("pools: {cpu: {replicas: [{name: x}]}}\n")
        refused = admin.ReloadRegistry(router_pb2.ReloadRequest(), timeout=5)
        assert refused.error and not refused.changed, "a bad file is refused and the registry stays"
        broken.write_text(good)
    finally:
        reload_with(routed, admin, WEIGHTS)
    assert set(served_versions(router, [f"session-{i}" for i in range(5)])) <= {"1", "2"}


def test_a_drained_replica_gets_no_new_requests_and_finishes_its_streams(routed, admin, gateway):
    outcome: dict = {}

    def stream() -> None:
        outcome["last"] = generate(gateway, chat("Count from 1 to 200.", max_tokens=100, temperature=0.0))[-1]

    runner = threading.Thread(target=stream)
    runner.start()
    busy = wait_in_flight(admin)
    assert busy, "the stream never showed as in flight"
    try:
        drained = admin.DrainReplica(router_pb2.DrainRequest(replica=busy), timeout=5)
        assert drained.draining
        embed = mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["drain"], cache_mode=mesh_pb2.CACHE_MODE_BYPASS)
        placed = {gateway.Embed(embed, metadata=AUTH, timeout=30).metadata.replica for _ in range(20)}
        placed |= {generate(gateway, _with_system(f"While draining {i}?", 2))[-1].metadata.replica
                   for i in range(3)}
        assert busy not in placed, placed
        runner.join()
        assert outcome["last"].metadata.replica == busy
        assert outcome["last"].finish_reason in COMPLETED, outcome["last"]
    finally:
        admin.UndrainReplica(router_pb2.DrainRequest(replica=busy), timeout=5)
    with pytest.raises(grpc.RpcError) as unknown:
        admin.DrainReplica(router_pb2.DrainRequest(replica="nope"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

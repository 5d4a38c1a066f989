"""Triton replicas failing under load, on real processes: one killed during 100 concurrent streams (every
stream continues on the other replica with exactly the text it would have had), and the registry's pool and
model fallbacks named in the metadata."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import yaml

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from tests.conftest import AUTH, LLM, chat
from tools.processes import free_port
from tools.stack import LocalStack, StackPorts

STREAMS = 100
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def llm_pair(tmp_path_factory, tenants_file):
    # Two LLM replicas; the per-replica bound is raised so that one replica can take all 100 streams after the
    # other dies (the default sheds beyond 64, which is what it should do in production). The survivor carries
    # them on 2 cores shared with everything else: a clean CI run once saw 3 of 100 streams pass the 60 s
    # production deadline. What this test proves is exact continuation, so the gateway's deadline and the
    # router's per-attempt bound are widened.
    mesh = LocalStack(tmp_path_factory.mktemp("chaos-llm"), StackPorts.free(2, gateways=1), tenants_file=tenants_file,
                      triton_models=["smollm2"], with_edge=False, with_cache=False, with_retrieval=False,
                      service_env={"router": {"MESH_ROUTER_MAX_IN_FLIGHT_PER_REPLICA": "256",
                                              "MESH_ROUTER_DEFAULT_TIMEOUT_S": "180"},
                                   "gateway": {"MESH_GATEWAY_GENERATE_TIMEOUT_S": "180"}})
    mesh.start()
    yield mesh
    mesh.stop()


def stream_request(i: int) -> mesh_pb2.GenerateRequest:
    """Half greedy, half seeded sampling: both must continue exactly after a failover."""
    sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.9, "seed": 1000 + i}
    return chat(f"Story {i}: tell me about a lighthouse keeper and a storm.", max_tokens=MAX_TOKENS, **sampling)


async def run_streams(address: str, on_chunk=None) -> list[tuple[str, mesh_pb2.GenerateChunk | str]]:
    """All streams at once; each gives (text, last chunk) or (text so far, error)."""
    async with grpc.aio.insecure_channel(address) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)

        async def one(i: int) -> tuple[str, mesh_pb2.GenerateChunk | str]:
            text, last = [], None
            try:
                async for chunk in mesh.Generate(stream_request(i), metadata=AUTH, timeout=240):
                    text.append(chunk.text)
                    if on_chunk is not None:
                        on_chunk(i, len(text), chunk)
                    last = chunk
            except grpc.aio.AioRpcError as exc:
                return "".join(text), f"{exc.code().name}: {exc.details()}"
            return "".join(text), last

        return await asyncio.gather(*(one(i) for i in range(STREAMS)))


def test_replica_killed_during_100_streams_every_stream_completes_with_the_right_text(llm_pair):
    stack = llm_pair
    expected = asyncio.run(run_streams(stack.gateway_address))
    assert all(not isinstance(last, str) for _, last in expected), [e for e in expected if isinstance(e[1], str)][:3]
    assert {last.metadata.replica for _, last in expected} == {"triton-cpu-0", "triton-cpu-1"}

    progress: dict[int, int] = {}

    def kill_mid_stream(i: int, chunks: int, chunk: mesh_pb2.GenerateChunk) -> None:
        # Once the streams are well under way, halfway through one of them, and only while another stream is in
        # the middle of its generation too: each replica generates one stream at a time, so one of the two is
        # on the replica killed. (Killing on the first condition alone once landed while triton-1 was between two
        # generations, and no stream was cut.)
        progress[i] = MAX_TOKENS if chunk.finish_reason else chunks   # a finished stream is no longer under way
        under_way = sum(1 for n in progress.values() if 0 < n < MAX_TOKENS - 4)
        if i >= STREAMS // 5 and chunks == MAX_TOKENS // 2 and under_way >= 2 and stack.processes["triton-1"].alive():
            stack.processes["triton-1"].kill()  # SIGKILL: no goodbye

    got = asyncio.run(run_streams(stack.gateway_address, kill_mid_stream))
    failures = [(i, last) for i, (_, last) in enumerate(got) if isinstance(last, str)]
    assert not failures, failures[:5]
    for i, ((want_text, want), (text, last)) in enumerate(zip(expected, got, strict=True)):
        assert text == want_text, f"stream {i} ({last.metadata.replica}, resumed {last.metadata.resumed})"
        assert last.finish_reason == want.finish_reason and last.usage == want.usage, i
    resumed = [last for _, last in got if last.metadata.resumed]
    assert resumed, "no stream was cut mid-generation: the kill came between generations"
    assert all(last.metadata.replica == "triton-cpu-0" for last in resumed)
    assert sum(last.metadata.retries for _, last in got) >= len(resumed)


def test_pool_and_model_fallbacks_are_named_in_the_metadata(llm_pair):
    stack = llm_pair
    original = stack.registry_path.read_text()
    registry = yaml.safe_load(original)
    # A t4 replica that cannot be reached: requests pass over the t4 pool to cpu. A model placed only on the
    # (empty) a100 pool: its requests go to its fallback model.
    registry["pools"]["t4"]["replicas"] = [{"name": "t4-unreachable", "grpc": f"127.0.0.1:{free_port()}"}]
    registry["models"]["smollm2-large"] = {**registry["models"][LLM], "pools": ["a100"], "fallback": LLM}
    stack.registry_path.write_text(yaml.safe_dump(registry))
    with grpc.insecure_channel(stack.router_address) as channel:
        admin = router_pb2_grpc.RouterAdminStub(channel)
        assert admin.ReloadRegistry(router_pb2.ReloadRequest(), timeout=10).changed
        models = {m.name: m for m in admin.ListModels(router_pb2.RouterListModelsRequest(), timeout=10).models}
        assert models["smollm2-large"].fallback == LLM and models["smollm2-large"].ready
    try:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            last = list(mesh.Generate(chat("Say hello.", max_tokens=4, temperature=0.0), metadata=AUTH,
                                      timeout=60))[-1]
            assert (last.metadata.fallback, last.metadata.pool) == ("pool t4->cpu", "cpu")
            deadline = time.monotonic() + 15  # the gateway learns new models on its next catalog refresh (5 s)
            while True:
                try:
                    last = list(mesh.Generate(chat("Say hello.", max_tokens=4, temperature=0.0,
                                                   model="smollm2-large"), metadata=AUTH, timeout=60))[-1]
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline, exc
                    time.sleep(0.5)
            assert last.metadata.model == "smollm2-large"
            assert last.metadata.fallback == f"model smollm2-large->{LLM}" and last.metadata.pool == "cpu"
    finally:
        stack.registry_path.write_text(original)
        with grpc.insecure_channel(stack.router_address) as channel:
            router_pb2_grpc.RouterAdminStub(channel).ReloadRegistry(router_pb2.ReloadRequest(), timeout=10)

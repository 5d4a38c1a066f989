"""The token path under load, with the TensorRT-LLM stand-in in its fast mode (no compute; bench/token_relay.py's
stack): 256 concurrent streams through the BLS model all finish (its python backend stub once crashed there), and
streams that were coalesced on the way (the BLS model and the router forward what is ready as one message) carry
exactly the text and token counts of a stream read alone. The gateway streams from the replica on a placement
lease from the router (services/router/placement_service.py): the lease's own contract is held here too."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH
from bench.token_relay import MODEL, relay_stack
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from services.common.kserve import InferRequestBuilder, is_final_response, output_arrays
from tools.metrics import metric_sum
from tools.processes import free_port
from tools.stack import LocalStack

STREAMS = 256
TOKENS = 48
PROMPT = "Tell me about the mesh."


@pytest.fixture(scope="module")
def fast_stack(tmp_path_factory) -> Iterator[LocalStack]:
    stack = relay_stack(tmp_path_factory.mktemp("token-relay-load"))
    stack.start()
    yield stack
    stack.stop()


async def _triton_stream(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> tuple[str, int, int]:
    """(text, completion tokens, messages) of one greedy stream straight from Triton."""
    request = InferRequestBuilder(MODEL).add_bytes("messages", [json.dumps(
        [{"role": "user", "content": PROMPT}]).encode()]).add_array(
        "max_tokens", np.array([TOKENS], np.int32)).add_array("temperature", np.array([0.0], np.float32)).build()
    text, produced, messages = b"", 0, 0
    async for item in stub.ModelStreamInfer(iter([request]), timeout=120):
        assert not item.error_message, item.error_message
        outputs = output_arrays(item.infer_response)
        text += outputs["text_output"].reshape(-1)[0]
        produced = int(outputs["completion_tokens"].reshape(-1)[0])
        messages += 1
        if is_final_response(item.infer_response):
            break
    return text.decode(), produced, messages


async def _mesh_stream(stub: mesh_pb2_grpc.InferenceMeshStub) -> tuple[str, int, int]:
    """(text, completion tokens, messages) of one greedy stream through the gateway and the router."""
    request = mesh_pb2.GenerateRequest(model=MODEL, max_tokens=TOKENS, temperature=0.0,
                                       cache_mode=mesh_pb2.CACHE_MODE_BYPASS,
                                       messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=PROMPT)])
    text, produced, messages = "", 0, 0
    async for chunk in stub.Generate(request, metadata=AUTH, timeout=120):
        text += chunk.text
        messages += 1
        if chunk.finish_reason:
            produced = chunk.usage.completion_tokens
    return text, produced, messages


async def _alone_and_together(address: str, stub_of, stream) -> tuple[tuple[str, int, int], list]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stub_of(channel)
        alone = await stream(stub)
        together = await asyncio.gather(*(stream(stub) for _ in range(STREAMS)))
    return alone, together


def _same_as_alone(alone: tuple[str, int, int], together: list[tuple[str, int, int]]) -> None:
    text, produced, _ = alone
    assert produced == TOKENS and len(text) > TOKENS
    assert all((t, p) == (text, produced) for t, p, _ in together)
    # Coalescing happened somewhere under this load; the text above is the same anyway.
    assert sum(m for _, _, m in together) < STREAMS * TOKENS


def test_256_streams_through_the_bls_model_all_finish_with_the_text_of_one_alone(fast_stack):
    alone, together = asyncio.run(_alone_and_together(
        f"127.0.0.1:{fast_stack.ports.tritons[0].grpc}", service_pb2_grpc.GRPCInferenceServiceStub, _triton_stream))
    _same_as_alone(alone, together)


def test_256_streams_through_the_mesh_carry_the_text_and_counts_of_one_alone(fast_stack):
    alone, together = asyncio.run(_alone_and_together(
        fast_stack.gateway_address, mesh_pb2_grpc.InferenceMeshStub, _mesh_stream))
    _same_as_alone(alone, together)


def _leases(stack: LocalStack, end: str) -> float:
    """The router's count of placement leases that ended so (served, refused, abandoned)."""
    return metric_sum(stack.ports.router_metrics, "mesh_router_leases_total", end=end)


async def _router_relayed(address: str) -> tuple[str, int]:
    """(text, completion tokens) of the greedy stream relayed by the router (KServe ModelStreamInfer)."""
    request = InferRequestBuilder(MODEL).add_bytes("messages", [json.dumps(
        [{"role": "user", "content": PROMPT}]).encode()]).add_array(
        "max_tokens", np.array([TOKENS], np.int32)).add_array("temperature", np.array([0.0], np.float32)).build()
    text, produced = b"", 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        async for item in stub.ModelStreamInfer(iter([request]), timeout=120):
            assert not item.error_message, item.error_message
            outputs = output_arrays(item.infer_response)
            text += outputs["text_output"].reshape(-1)[0]
            produced = int(outputs["completion_tokens"].reshape(-1)[0])
            if is_final_response(item.infer_response):
                break
    return text.decode(), produced


def test_a_generation_streams_from_the_replica_on_a_lease_with_the_relayed_text(fast_stack):
    """The gateway's default token path: the router grants a replica and the stream flows Triton -> gateway. Its
    text and counts are those of a gateway whose router relays every token (MESH_GATEWAY_TOKEN_PATH=router) and
    of the router's own KServe relay; only the direct one takes a lease."""
    port, metrics = free_port(), free_port()
    relaying = fast_stack.start_gateway_as("gateway-relayed", {
        **fast_stack.gateway_env(port, metrics), "MESH_GATEWAY_TOKEN_PATH": "router"})

    async def through(address: str) -> tuple[str, int]:
        async with grpc.aio.insecure_channel(address) as channel:
            text, produced, _ = await _mesh_stream(mesh_pb2_grpc.InferenceMeshStub(channel))
        return text, produced

    served = _leases(fast_stack, "served")
    relayed = asyncio.run(through(relaying))
    assert _leases(fast_stack, "served") == served, "the router-relayed path takes no lease"
    direct = asyncio.run(through(fast_stack.gateway_address))
    assert _leases(fast_stack, "served") == served + 1
    assert direct == relayed == asyncio.run(_router_relayed(fast_stack.router_address))
    assert direct[1] == TOKENS


def _in_flight(stack: LocalStack) -> int:
    with grpc.insecure_channel(stack.router_address) as channel:
        answer = router_pb2_grpc.RouterAdminStub(channel).ListReplicas(router_pb2.ListReplicasRequest(), timeout=5)
    return sum(r.in_flight for r in answer.replicas)


def test_a_lease_holds_its_replica_slot_until_its_caller_goes_away(fast_stack):
    """A gateway that dies mid-stream gives the slot back with its connection: no timer, no leak."""
    abandoned = _leases(fast_stack, "abandoned")

    async def lease_then_leave() -> router_pb2.LeaseGrant:
        async with grpc.aio.insecure_channel(fast_stack.router_address) as channel:
            call = router_pb2_grpc.PlacementLeasesStub(channel).Lease(
                timeout=30, metadata=(("x-mesh-tenant", "acme"),))
            await call.write(router_pb2.LeaseReport(ask=router_pb2.LeaseAsk(model=MODEL)))
            granted = await call.read()
            assert await asyncio.to_thread(_in_flight, fast_stack) == 1
            call.cancel()
            return granted

    granted = asyncio.run(lease_then_leave())
    assert granted.triton_model == MODEL and granted.endpoint.endswith(str(fast_stack.ports.tritons[0].grpc))
    assert granted.stall_timeout_s > 0 and not granted.refused_code
    deadline = time.monotonic() + 5
    while _in_flight(fast_stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _in_flight(fast_stack) == 0
    assert _leases(fast_stack, "abandoned") == abandoned + 1


def test_the_routers_refusal_is_the_last_grant_not_the_calls_status(fast_stack):
    """An unknown model (or a shed request) is the router's verdict on the request, not a router failure: the
    call succeeds, so a gateway's breaker on the router never counts it."""
    async def lease(ask: router_pb2.LeaseReport) -> list[router_pb2.LeaseGrant]:
        async with grpc.aio.insecure_channel(fast_stack.router_address) as channel:
            call = router_pb2_grpc.PlacementLeasesStub(channel).Lease(timeout=30)
            await call.write(ask)
            await call.done_writing()
            grants = [g async for g in call]
            assert await call.code() == grpc.StatusCode.OK
            return grants

    refused = _leases(fast_stack, "refused")
    grants = asyncio.run(lease(router_pb2.LeaseReport(ask=router_pb2.LeaseAsk(model="no-such-model"))))
    assert len(grants) == 1 and grants[0].refused_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-model" in grants[0].refused and not grants[0].endpoint
    assert _leases(fast_stack, "refused") == refused + 1

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(lease(router_pb2.LeaseReport(outcome=router_pb2.AttemptReport())))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ask" in caught.value.details()

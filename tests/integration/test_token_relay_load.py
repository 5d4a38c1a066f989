"""The token path under load, with the TensorRT-LLM stand-in in its fast mode (no compute; bench/token_relay.py's
stack): 256 concurrent streams through the BLS model all finish (its python backend stub once crashed there), and
streams that were coalesced on the way (the BLS model and the router forward what is ready as one message) carry
exactly the text and token counts of a stream read alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH
from bench.token_relay import MODEL, relay_stack
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.common.kserve import InferRequestBuilder, is_final_response, output_arrays
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

"""Usage records (services/admin/usage.py) against what clients really received: 1,000 mixed requests through the
real Envoy and gateways (fresh generations, cache hits, cancelled streams, embeddings) summed in the OpenAI-shaped
report (the loss bound of a gateway killed mid-load is tested on the PostgreSQL stack, test_admin_plane.py)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.gateway.budgets import input_tokens
from tests.conftest import EMBEDDER, chat
from tests.integration.admin_helpers import new_key, report_once_written


def _tokens(chunks: list[mesh_pb2.GenerateChunk]) -> int:
    """Tokens in what the client received, counted as the mesh counts them (a delta's token_index)."""
    produced = 0
    for chunk in chunks:
        if chunk.text:  # the last chunk of a finished stream repeats the last index with no text
            produced = max(produced + 1, chunk.token_index + 1)
    return produced


def test_usage_records_equal_what_1000_mixed_requests_received(stack):
    tenant, key_id, secret = new_key(stack)
    auth = (("authorization", f"Bearer {secret}"),)
    start = int(time.time()) - 60
    rng = random.Random(7)
    repeated = [f"Usage check {i}: say one word." for i in range(5)]
    plan = ["fresh"] * 200 + ["repeat"] * 550 + ["cancel"] * 100 + ["embed"] * 150
    rng.shuffle(plan)
    received = {"generations": 0, "completion": 0, "prompt": 0, "cancelled": 0, "cancel_tokens": 0,
                "embeds": 0, "embed_tokens": 0}

    async def one(stub: mesh_pb2_grpc.InferenceMeshStub, index: int, kind: str) -> None:
        if kind == "embed":
            texts = [f"usage text {index} " * (1 + index % 3)]
            await stub.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=texts), metadata=auth, timeout=60)
            received["embeds"] += 1
            received["embed_tokens"] += input_tokens(texts)
            return
        if kind == "cancel":
            call = stub.Generate(chat(f"Count slowly from one to forty, request {index}.", max_tokens=48),
                                 metadata=auth, timeout=120)
            got = [await call.read()]
            call.cancel()
            received["cancelled"] += 1
            received["cancel_tokens"] += _tokens(got)
            return
        prompt = rng.choice(repeated) if kind == "repeat" else f"Name a colour, request {index}."
        request = chat(prompt, max_tokens=3, temperature=0.0)  # greedy: cacheable
        chunks = [chunk async for chunk in stub.Generate(request, metadata=auth, timeout=120)]
        final = chunks[-1]
        assert final.finish_reason and final.usage.completion_tokens == _tokens(chunks)
        received["generations"] += 1
        received["completion"] += final.usage.completion_tokens
        received["prompt"] += final.usage.prompt_tokens

    async def load() -> None:
        credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{stack.ports.edge}", credentials) as channel:
            stub = mesh_pb2_grpc.InferenceMeshStub(channel)
            queue = list(enumerate(plan))

            async def worker() -> None:
                while queue:
                    index, kind = queue.pop()
                    await one(stub, index, kind)
            await asyncio.gather(*(worker() for _ in range(8)))

    asyncio.run(load())
    completions = report_once_written(stack, "completions", tenant, start, 850)
    embeddings = report_once_written(stack, "embeddings", tenant, start, 150)
    assert [r["api_key_id"] for r in completions] == [key_id]
    recorded = completions[0]
    assert recorded["num_model_requests"] == received["generations"] + received["cancelled"] == 850
    assert recorded["mesh_cache_hits"] >= 400, "the repeated questions were answered from the cache"
    assert recorded["mesh_failed_or_cancelled"] == received["cancelled"]
    # Finished streams: exactly what the clients received. A cancelled stream is recorded with what the gateway
    # sent before the cancel reached it, at least what the client read; the excess is reported below.
    finished_completion = received["completion"]
    excess = recorded["output_tokens"] - finished_completion - received["cancel_tokens"]
    assert 0 <= excess <= 2 * received["cancelled"], (recorded, received)
    assert recorded["input_tokens"] >= received["prompt"]
    assert embeddings[0]["num_model_requests"] == received["embeds"] == 150
    assert embeddings[0]["input_tokens"] == received["embed_tokens"]
    print(f"usage records: {recorded['num_model_requests']} generations, {recorded['mesh_cache_hits']} cache hits, "
          f"completion tokens recorded {recorded['output_tokens']} vs received "
          f"{finished_completion + received['cancel_tokens']} (cancel excess {excess}); "
          f"{embeddings[0]['num_model_requests']} embeddings, {embeddings[0]['input_tokens']} tokens")


def test_stock_triton_clients_are_recorded_too(stack):
    """KServe calls (tritonclient, unchanged) leave usage records: a streamed generation with the prompt and
    completion its model reported, an embedding with its input as the budget counts it, a refused model as
    a failure."""
    import numpy as np
    import tritonclient.grpc as triton_grpc

    from services.gateway.budgets import input_tokens_of
    from tests.conftest import LLM

    tenant, key_id, secret = new_key(stack)
    headers = {"x-api-key": secret}
    start = int(time.time()) - 60
    client = triton_grpc.InferenceServerClient(stack.gateway_address)
    try:
        text = triton_grpc.InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"usage of a stock client"]], dtype=object))
        client.infer(EMBEDDER, [text], headers=headers)
        responses: list = []
        done = threading.Event()

        def collect(result, error) -> None:
            responses.append((result, error))
            if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
                done.set()
        client.start_stream(callback=collect, headers=headers)
        messages = triton_grpc.InferInput("messages", [1], "BYTES")
        messages.set_data_from_numpy(np.array([b'[{"role": "user", "content": "Say hi."}]'], dtype=object))
        max_tokens = triton_grpc.InferInput("max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([5], dtype=np.int32))
        client.async_stream_infer(LLM, [messages, max_tokens], request_id="usage-kserve-1")
        assert done.wait(120) and all(error is None for _, error in responses), responses
        client.stop_stream()
        pieces = [r.as_numpy("text_output")[0] for r, _ in responses if r.as_numpy("text_output") is not None]
    finally:
        client.close()
    generated = report_once_written(stack, "completions", tenant, start, 1)
    embedded = report_once_written(stack, "embeddings", tenant, start, 1)
    assert [r["api_key_id"] for r in generated] == [key_id] and generated[0]["num_model_requests"] == 1
    assert 1 <= generated[0]["output_tokens"] <= 5 and generated[0]["input_tokens"] > 0
    assert len([p for p in pieces if p]) <= generated[0]["output_tokens"]
    assert embedded[0]["num_model_requests"] == 1
    # What the budget charged: the tensor's raw bytes, each BYTES element behind its 4-byte length.
    assert embedded[0]["input_tokens"] == input_tokens_of(4 + len(b"usage of a stock client"))

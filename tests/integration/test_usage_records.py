"""Usage records (services/admin/usage.py) against what clients really received: 1,000 mixed requests through the
real Envoy and gateways (fresh generations, cache hits, cancelled streams, embeddings) summed in the OpenAI-shaped
report; and a gateway killed with SIGKILL mid-load loses at most one flush interval of records."""

from __future__ import annotations

import asyncio
import random
import signal
import ssl
import threading
import time
import uuid

import grpc
import httpx

from bench.token_relay import MODEL as RELAY_MODEL
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.gateway.budgets import input_tokens
from tests.conftest import EMBEDDER, chat
from tests.integration.test_admin_plane import _admin, _usable, postgres_stack  # noqa: F401 (a fixture)
from tools.stack import LocalStack

FLUSH_S = 1.0  # UsageSettings.flush_s, the default the stacks run with


def _new_key(stack: LocalStack) -> tuple[str, str, str]:
    """(tenant, key id, secret) of a fresh tenant on a roomy tier, usable at the edge."""
    admin = _admin(stack)
    tenant = f"usage-{uuid.uuid4().hex[:8]}"
    admin.ok("PUT", "/tiers/usage-bulk", {"requests_per_minute": 100000, "burst": 10000,
                                          "tokens_per_minute": 0, "tokens_per_month": 0})
    admin.ok("POST", "/tenants", {"id": tenant, "tier": "usage-bulk"})
    issued = admin.ok("POST", f"/tenants/{tenant}/keys", {})
    with httpx.Client(verify=ssl.create_default_context(cafile=str(stack.pki.ca_cert)), timeout=10) as client:
        _usable(client, stack, issued["secret"])
    return tenant, issued["key"]["id"], issued["secret"]


def _tokens(chunks: list[mesh_pb2.GenerateChunk]) -> int:
    """Tokens in what the client received, counted as the mesh counts them (a delta's token_index)."""
    produced = 0
    for chunk in chunks:
        if chunk.text:  # the last chunk of a finished stream repeats the last index with no text
            produced = max(produced + 1, chunk.token_index + 1)
    return produced


def _report(stack: LocalStack, kind: str, tenant: str, start: int) -> list[dict]:
    admin = _admin(stack)
    page = admin.http.get(f"https://localhost:{stack.ports.edge}/v1/organization/usage/{kind}",
                          params={"start_time": start, "bucket_width": "1d", "project_ids": tenant,
                                  "group_by": "api_key_id"},
                          headers={"authorization": f"Bearer {admin.token}"})
    assert page.status_code == 200, page.text
    return [result for bucket in page.json()["data"] for result in bucket["results"]]


def test_usage_records_equal_what_1000_mixed_requests_received(stack):
    tenant, key_id, secret = _new_key(stack)
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
    time.sleep(FLUSH_S + 1.0)
    completions = _report(stack, "completions", tenant, start)
    embeddings = _report(stack, "embeddings", tenant, start)
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


def test_a_killed_gateway_loses_at_most_one_flush_interval(postgres_stack):  # noqa: F811
    stack, _ = postgres_stack
    tenant, _, secret = _new_key(stack)
    auth = (("authorization", f"Bearer {secret}"),)
    start = int(time.time()) - 60
    finished: list[float] = []

    async def load(until: float) -> None:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = mesh_pb2_grpc.InferenceMeshStub(channel)

            async def worker(n: int) -> None:
                index = 0
                while time.monotonic() < until:
                    index += 1
                    request = chat(f"kill test {n}-{index}", max_tokens=4, model=RELAY_MODEL)
                    try:
                        async for _ in stub.Generate(request, metadata=auth, timeout=30):
                            pass
                    except grpc.aio.AioRpcError:
                        return
                    finished.append(time.monotonic())
            await asyncio.gather(*(worker(n) for n in range(4)))

    gateway = stack.processes["gateway"]
    killed_at: list[float] = []

    async def kill_later() -> None:
        await asyncio.sleep(3.5)
        gateway.popen.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    async def both() -> None:
        await asyncio.gather(load(time.monotonic() + 6), kill_later())
    asyncio.run(both())
    stack.start_gateway(0)  # the edge's only gateway: the report is read through it
    done = [t for t in finished if t <= killed_at[0]]
    recorded = sum(r["num_model_requests"] for r in _report(stack, "completions", tenant, start))
    lost = len(done) - recorded
    window = [t for t in done if t > killed_at[0] - FLUSH_S - 0.5]
    print(f"killed gateway: {len(done)} requests answered, {recorded} recorded, {lost} lost; "
          f"{len(window)} answered in its last flush interval")
    assert len(done) > 20 and recorded <= len(finished), "never more records than answers"
    assert lost <= len(window), "lost at most what the last flush had not written"


def test_stock_triton_clients_are_recorded_too(stack):
    """KServe calls (tritonclient, unchanged) leave usage records: a streamed generation with the prompt and
    completion its model reported, an embedding with its input as the budget counts it, a refused model as
    a failure."""
    import numpy as np
    import tritonclient.grpc as triton_grpc

    from services.gateway.budgets import input_tokens_of
    from tests.conftest import LLM

    tenant, key_id, secret = _new_key(stack)
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
    time.sleep(FLUSH_S + 1.0)
    generated = _report(stack, "completions", tenant, start)
    embedded = _report(stack, "embeddings", tenant, start)
    assert [r["api_key_id"] for r in generated] == [key_id] and generated[0]["num_model_requests"] == 1
    assert 1 <= generated[0]["output_tokens"] <= 5 and generated[0]["input_tokens"] > 0
    assert len([p for p in pieces if p]) <= generated[0]["output_tokens"]
    assert embedded[0]["num_model_requests"] == 1
    # What the budget charged: the tensor's raw bytes, each BYTES element behind its 4-byte length.
    assert embedded[0]["input_tokens"] == input_tokens_of(4 + len(b"usage of a stock client"))

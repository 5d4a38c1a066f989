"""Fuzzing the public API: random, extreme and mutated messages, bad metadata. No process dies, no INTERNAL or
UNKNOWN, every reply a status a client can act on."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import grpc
import pytest

from inference_mesh.v1 import mesh_pb2, retrieval_pb2
from tests.conftest import EMBEDDER, KEYS, LLM

CASES = 10_000
MESH = "/inference_mesh.v1.InferenceMesh/"
DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED}
STREAMING = {"Generate", "Ask"}
WEIRD_TEXT = ["", " ", "\x00", "é" * 3, "🙂" * 50, "a" * 70_000, "\u202e\u0301", "x" * 9_000, "{\"role\": 1}"]
WEIRD_FLOATS = [0.0, -1.0, 2.0000001, 1e38, -1e-45, math.inf, -math.inf, math.nan, 0.5]
WEIRD_INTS = [0, 1, 2, 3, 63, 1025, 2**31 - 1, 2**32 - 1]


def _text(rng: random.Random) -> str:
    return rng.choice(WEIRD_TEXT) if rng.random() < 0.7 else "".join(chr(rng.randrange(32, 0x2FFF))
                                                                        for _ in range(rng.randrange(1, 40)))


def random_generate(rng: random.Random, model: str) -> mesh_pb2.GenerateRequest:
    request = mesh_pb2.GenerateRequest(model=model, request_id=_text(rng)[:200],
                                       cache_mode=rng.choice([0, 1, 2, 7]), session_id=_text(rng)[:64],
                                       quality=rng.choice([0, 1, 42]))
    # Mostly invalid; now and then a valid short generation, so the model is exercised too.
    request.max_tokens = rng.choice(WEIRD_INTS) if rng.random() < 0.97 else 1
    for _ in range(rng.choice([0, 1, 2, 70])):
        request.messages.add(role=rng.choice([0, 1, 2, 3, 99]), content=_text(rng))
    if rng.random() < 0.5:
        request.temperature = rng.choice(WEIRD_FLOATS)
    if rng.random() < 0.3:
        request.top_p = rng.choice(WEIRD_FLOATS)
    if rng.random() < 0.3:
        request.seed = rng.choice([0, 2**63, 2**64 - 1])
    request.stop.extend(_text(rng) for _ in range(rng.choice([0, 1, 5])))
    return request


def random_message(rng: random.Random) -> tuple[str, bytes]:
    method = rng.choice(["Generate", "Embed", "ListModels", "Ask", "Search", "DeleteDocuments", "CollectionStats"])
    model = rng.choice([LLM, EMBEDDER, "", "nope", "chat", _text(rng)])
    if method == "Generate":
        message = random_generate(rng, model)
    elif method == "Embed":
        message = mesh_pb2.EmbedRequest(model=model, texts=[_text(rng) for _ in range(rng.choice([0, 1, 3, 300]))],
                                        cache_mode=rng.choice([0, 1, 2, 9]))
    elif method == "Ask":
        message = mesh_pb2.AskRequest(model=model, question=_text(rng), top_k=rng.choice(WEIRD_INTS[:6]),
                                      max_tokens=rng.choice([0, 1, 5000]), filter=_text(rng))
    elif method == "Search":
        message = retrieval_pb2.SearchRequest(query=_text(rng), top_k=rng.choice(WEIRD_INTS), filter=_text(rng),
                                              ef=rng.choice(WEIRD_INTS))
        if rng.random() < 0.2:
            message.vector.extend(rng.choice(WEIRD_FLOATS) for _ in range(rng.choice([1, 384, 385])))
    elif method == "DeleteDocuments":
        message = retrieval_pb2.DeleteDocumentsRequest(ids=[_text(rng) for _ in range(rng.choice([0, 2]))])
    elif method == "CollectionStats":
        message = retrieval_pb2.CollectionStatsRequest()
    else:
        message = mesh_pb2.ListModelsRequest()
    raw = bytearray(message.SerializeToString())
    mutation = rng.random()
    if raw and mutation < 0.25:  # bit flips
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif raw and mutation < 0.35:  # truncation
        raw = raw[: rng.randrange(len(raw))]
    elif mutation < 0.45:  # random bytes, invalid UTF-8 included
        raw = bytearray(rng.randbytes(rng.randrange(1, 64)))
    return method, bytes(raw)


def random_metadata(rng: random.Random) -> tuple[tuple[str, str], ...]:
    choice = rng.random()
    if choice < 0.7:
        return (("x-api-key", KEYS["tenant-bulk"]),)
    if choice < 0.8:
        return ()
    if choice < 0.9:
        return (("authorization", rng.choice(["Bearer", "Bearer ", "Basic abc", "Bearer eyJ" + "a" * 50])),)
    return (("x-api-key", KEYS["tenant-bulk"]), ("x-junk", "v" * rng.choice([100, 7_000, 20_000])))


async def fire(channel: grpc.aio.Channel, method: str, raw: bytes, metadata) -> grpc.StatusCode:
    try:
        if method in STREAMING:
            call = channel.unary_stream(MESH + method)
            async for _ in call(raw, metadata=metadata, timeout=60):
                pass
        else:
            await channel.unary_unary(MESH + method)(raw, metadata=metadata, timeout=60)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in DEFINED:
            raise AssertionError(f"{method} answered {exc.code().name}: {exc.details()}") from exc
        return exc.code()


@pytest.mark.timeout(600)
async def test_fuzzed_public_api_gets_defined_statuses_and_nothing_dies(stack):
    rng = random.Random(20261122)
    cases = [(*random_message(rng), random_metadata(rng)) for _ in range(CASES)]
    seen: Counter[str] = Counter()
    failures: list[str] = []
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        queue = list(cases)

        async def worker() -> None:
            while queue:
                method, raw, metadata = queue.pop()
                try:
                    seen[(await fire(channel, method, raw, metadata)).name] += 1
                except AssertionError as exc:
                    failures.append(str(exc))

        await asyncio.gather(*(worker() for _ in range(16)))
    assert not failures, f"{len(failures)} undefined statuses, e.g. {failures[:5]}"
    assert sum(seen.values()) == CASES
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > CASES // 4, seen
    for name, process in stack.processes.items():
        assert process.alive(), f"{name} died during the fuzz run"

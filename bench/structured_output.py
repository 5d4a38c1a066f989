"""What constrained decoding costs on the CPU pool: tokens/s and time to first token with and without a JSON schema,
straight to Triton and through the gateway in alternating rounds of one run, and the schema's compile time cold
(a schema the model has not seen) and warm (its grammar cached). Prints a table and rewrites its section of
BENCHMARKS.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable
from itertools import count

import grpc
import numpy as np
from tritonclient.grpc import service_pb2_grpc

from bench.inference_path import (
    AUTH,
    PROMPT,
    ROOT,
    Sample,
    pct,
    stream_sample,
    triton_stream_sample,
    write_section,
)
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.common.kserve import SCHEMA_INPUT, InferRequestBuilder
from tools.stack import LocalStack, StackPorts

LLM = "smollm2-135m-instruct"
MAX_TOKENS = 64
# A record with every kind the decoder enforces: strings with bounds, an integer, an enum, a bounded array, a
# nested object, a union with null.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
    "colour": {"enum": ["red", "green", "blue"]},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"],
             "additionalProperties": False},
    "nickname": {"anyOf": [{"type": "string", "maxLength": 16}, {"type": "null"}]}},
    "required": ["name", "age", "colour", "hobbies", "home", "nickname"], "additionalProperties": False}
Call = Callable[[], Awaitable[Sample]]
_fresh = count()


def _prompt() -> list[dict]:
    # A new question each call: every request pays its whole prefill, so TTFT compares like with like (a replica
    # reuses the KV of a prompt it has just seen, which made back-to-back identical requests look 6x faster).
    return [{"role": "user", "content": f"{PROMPT[0]['content']} (request {next(_fresh)})"}]


def _schema(cold: bool) -> str:
    # A new description is a new schema text: the model's grammar cache misses and it compiles again.
    return json.dumps({**SCHEMA, "description": f"record {next(_fresh)}"} if cold else SCHEMA)


def direct(triton: service_pb2_grpc.GRPCInferenceServiceStub, constrained: bool, cold: bool = False) -> Call:
    async def call() -> Sample:
        builder = InferRequestBuilder("smollm2").add_bytes("messages", [json.dumps(_prompt()).encode()])
        builder.add_array("max_tokens", np.array([MAX_TOKENS], np.int32))
        builder.add_array("temperature", np.array([0.0], np.float32))
        if constrained:
            builder.add_bytes(SCHEMA_INPUT, [_schema(cold).encode()])
        return await triton_stream_sample(triton, builder.build())
    return call


def mesh(stub: mesh_pb2_grpc.InferenceMeshStub, constrained: bool, cold: bool = False) -> Call:
    async def call() -> Sample:
        request = mesh_pb2.GenerateRequest(
            model=LLM, max_tokens=MAX_TOKENS, temperature=0.0, cache_mode=mesh_pb2.CACHE_MODE_BYPASS,
            messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=_prompt()[0]["content"])])
        if constrained:
            request.response_format.CopyFrom(mesh_pb2.ResponseFormat(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
                                                                     schema=_schema(cold)))
        t0, first, tokens = time.perf_counter(), None, 0
        async for chunk in stub.Generate(request, metadata=AUTH, timeout=120):
            if chunk.text and first is None:
                first = time.perf_counter()
            if chunk.finish_reason:
                tokens = chunk.usage.completion_tokens
        return stream_sample(t0, first, time.perf_counter(), tokens)
    return call


def compile_times(repeats: int) -> dict[str, float]:
    """llama.cpp's converter on this schema in Triton's environment: the part of a cold request that is Python."""
    script = f"""
import json, sys, time
sys.path.insert(0, "triton_models/smollm2/1")
from constrained import GrammarCache
schema = json.loads({json.dumps(json.dumps(SCHEMA))})
cache = GrammarCache({repeats + 1})
cold = []
for i in range({repeats}):
    text = json.dumps(dict(schema, description=str(i)))
    started = time.perf_counter()
    cache.grammar(text)
    cold.append(time.perf_counter() - started)
started = time.perf_counter()
cache.grammar(json.dumps(dict(schema, description="0")))
warm = time.perf_counter() - started
print(json.dumps({{"cold_ms": sorted(cold)[len(cold) // 2] * 1000, "warm_ms": warm * 1000}}))
"""
    answer = subprocess.run([str(ROOT / ".venv-triton" / "bin" / "python"), "-c", script], cwd=ROOT, check=True,
                            capture_output=True, text=True, timeout=120)
    return json.loads(answer.stdout.strip().splitlines()[-1])


async def measure(stack: LocalStack, requests: int, rounds: int) -> dict[str, list[Sample]]:
    triton_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}")
    gateway_channel = grpc.aio.insecure_channel(stack.gateway_address)
    triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
    stub = mesh_pb2_grpc.InferenceMeshStub(gateway_channel)
    paths = {"direct free": direct(triton, False), "direct constrained": direct(triton, True),
             "mesh free": mesh(stub, False), "mesh constrained": mesh(stub, True),
             "mesh constrained, cold schema": mesh(stub, True, cold=True)}
    samples: dict[str, list[Sample]] = {name: [] for name in paths}
    try:
        for call in paths.values():
            await call()  # warm-up: the grammar of SCHEMA is cached from here on
        for _ in range(rounds):
            for name, call in paths.items():
                for _ in range(requests):
                    samples[name].append(await call())
    finally:
        await triton_channel.close()
        await gateway_channel.close()
    return samples


def render(samples: dict[str, list[Sample]], compiled: dict[str, float], command: str) -> str:
    free = pct([s.tpot_s for s in samples["direct free"]], 50)
    lines = [f"Command: `{command}` (bench/structured_output.py)  ",
             f"Machine: {platform.machine()}, 2 cores shared by every process and the client. One stream at a "
             f"time (the CPU pool runs one generation per replica), greedy, {MAX_TOKENS} tokens at most, cache "
             "bypassed. Constrained: a record schema (bounded strings, integer, enum, array, nested object, union "
             "with null). Cold schema: a new schema text each call, so the model compiles its grammar, and the system "
             "message that states the schema is new too (the compile itself is timed below). Each request asks a new "
             "question, so each pays its whole prefill.", "",
             "| path | TTFT p50 ms | ms per token p50 | tokens/s | per-token cost / direct free |",
             "|---|---:|---:|---:|---:|"]
    for name, got in samples.items():
        ttft = pct([s.ttft_s * 1000 for s in got], 50)
        tpot = pct([s.tpot_s for s in got], 50)
        lines.append(f"| {name} | {ttft:.1f} | {tpot * 1000:.1f} | {1 / tpot:.0f} | {tpot / free:.2f} |")
    lines += ["", f"Grammar compile (llama.cpp's converter, in Triton's environment, median of 20): cold "
                  f"{compiled['cold_ms']:.2f} ms, warm (cached) {compiled['warm_ms']:.3f} ms.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3, help="per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    stack = LocalStack(ROOT / "build" / "bench-structured", StackPorts.free(1, gateways=1), triton_models=["smollm2"],
                       with_edge=False, with_cache=False, with_retrieval=False)
    stack.start()
    try:
        samples = asyncio.run(measure(stack, args.requests, args.rounds))
    finally:
        stack.stop()
    markdown = render(samples, compile_times(20), "make bench")
    print(markdown)
    if not args.no_write:
        write_section(markdown, "structured-output", "Structured outputs: constrained vs free decoding")


if __name__ == "__main__":
    main()

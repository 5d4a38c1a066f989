"""Cache lookup cost: exact and semantic hits on the cache service, against generating on Triton directly.

Target: a semantic hit costs < 5 ms (a tenth of a fast generation's time to first token). Prints a table and
rewrites its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
from tritonclient.grpc import service_pb2_grpc

from bench.inference_path import ROOT, Sample, direct_generate, pct, run_load, write_section
from inference_mesh.v1 import cache_pb2, cache_pb2_grpc, mesh_pb2
from tools.stack import LocalStack, StackPorts

MODEL = "smollm2-135m-instruct"
SCOPE = cache_pb2.CacheScope(tenant="bench", model=MODEL, model_version="1")


def request_for(text: str) -> mesh_pb2.GenerateRequest:
    return mesh_pb2.GenerateRequest(model=MODEL, max_tokens=32, temperature=0.0,
                                    messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=text)])


async def measure(stack: LocalStack, requests: int) -> list[tuple[str, list[Sample]]]:
    channel = grpc.aio.insecure_channel(stack.cache_address)
    cache = cache_pb2_grpc.ResponseCacheStub(channel)
    stored = request_for("Write a short paragraph about mountains.")
    similar = request_for("write a short paragraph about the mountains.")
    response = cache_pb2.CachedResponse(chunks=["Mountains", " rise"], token_indices=[0, 1], prompt_tokens=30,
                                        completion_tokens=2, finish_reason=mesh_pb2.FINISH_REASON_STOP)
    await cache.Store(cache_pb2.StoreRequest(scope=SCOPE, request=stored, response=response, semantic=True))
    for _ in range(50):  # the semantic index loads in the background after start
        reply = await cache.Lookup(cache_pb2.LookupRequest(scope=SCOPE, request=similar, semantic=True))
        if reply.result == cache_pb2.LOOKUP_RESULT_SEMANTIC_HIT:
            break
        await cache.Release(cache_pb2.ReleaseRequest(scope=SCOPE, request=similar, lease=reply.lease))
        await cache.Store(cache_pb2.StoreRequest(scope=SCOPE, request=stored, response=response, semantic=True))
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError("no semantic hit: is milvus-lite up?")

    def lookup(req: mesh_pb2.GenerateRequest, expected: int):
        message = cache_pb2.LookupRequest(scope=SCOPE, request=req, semantic=True)

        async def call() -> Sample:
            t0 = time.perf_counter()
            reply = await cache.Lookup(message, timeout=10)
            if reply.result != expected:
                raise RuntimeError(f"expected {expected}, got {reply.result}")
            return Sample(time.perf_counter() - t0)
        return call

    triton_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}")
    direct = direct_generate(service_pb2_grpc.GRPCInferenceServiceStub(triton_channel))
    rows = [
        ("exact hit (Redis)", (await run_load(lookup(stored, cache_pb2.LOOKUP_RESULT_EXACT_HIT), 1, requests))[0]),
        ("semantic hit (embed on Triton + Milvus HNSW + Redis)",
         (await run_load(lookup(similar, cache_pb2.LOOKUP_RESULT_SEMANTIC_HIT), 1, requests))[0]),
        ("direct Triton generation, 32 tokens", (await run_load(direct, 1, max(requests // 20, 5)))[0]),
    ]
    await channel.close()
    await triton_channel.close()
    return rows


def render(rows: list[tuple[str, list[Sample]]]) -> str:
    direct_p50 = pct([s.latency_s * 1000 for s in rows[-1][1]], 50)
    lines = ["Command: `make bench` (bench/cache_lookup.py), concurrency 1, on the cache service's gRPC API.", "",
             "| path | n | p50 ms | p99 ms | direct generation p50 / this p50 |", "|---|---:|---:|---:|---:|"]
    for name, samples in rows:
        latencies = [s.latency_s * 1000 for s in samples]
        lines.append(f"| {name} | {len(samples)} | {pct(latencies, 50):.2f} | {pct(latencies, 99):.2f} "
                     f"| {direct_p50 / pct(latencies, 50):.0f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    stack = LocalStack(ROOT / "build" / "bench-cache", StackPorts.free(1, gateways=1), with_edge=False)
    stack.start()
    try:
        rows = asyncio.run(measure(stack, args.requests))
    finally:
        stack.stop()
    markdown = render(rows)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "cache-lookup", "Cache lookups")


if __name__ == "__main__":
    main()


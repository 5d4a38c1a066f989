"""Direct-to-Triton versus through the mesh (gateway → router → Triton), same requests, one run.

Embed: p50/p99 latency and req/s at concurrency 1, 8, 32. Generate (streaming): time to first token and
time per output token at the same concurrencies. Blocks of direct and mesh runs alternate so that drift
on a shared machine hits both. Prints a table and rewrites its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.common.kserve import InferRequestBuilder, is_final_response, output_arrays
from tools.stack import LocalStack, StackPorts

ROOT = Path(__file__).resolve().parents[1]
AUTH = (("x-api-key", "mesh-dev-key"),)
TEXT = "The mesh routes each request to the least busy Triton replica."
PROMPT = [{"role": "user", "content": "Write a short paragraph about mountains."}]
MAX_TOKENS = 32


@dataclass
class Sample:
    latency_s: float
    ttft_s: float = 0.0
    tpot_s: float = 0.0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_load(call: Callable[[], Awaitable[Sample]], concurrency: int,
                   requests: int) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            samples.append(await call())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def direct_embed(triton: service_pb2_grpc.GRPCInferenceServiceStub) -> Callable[[], Awaitable[Sample]]:
    request = InferRequestBuilder("minilm").add_bytes("TEXT", [TEXT.encode()], [1, 1]).build()

    async def call() -> Sample:
        t0 = time.perf_counter()
        await triton.ModelInfer(request, timeout=60)
        return Sample(time.perf_counter() - t0)
    return call


def mesh_embed(mesh: mesh_pb2_grpc.InferenceMeshStub, cached: bool = False) -> Callable[[], Awaitable[Sample]]:
    # Bypass the cache to compare the same work; `cached` measures the hit path instead.
    mode = mesh_pb2.CACHE_MODE_DEFAULT if cached else mesh_pb2.CACHE_MODE_BYPASS
    request = mesh_pb2.EmbedRequest(model="all-minilm-l6-v2", texts=[TEXT], cache_mode=mode)

    async def call() -> Sample:
        t0 = time.perf_counter()
        await mesh.Embed(request, metadata=AUTH, timeout=60)
        return Sample(time.perf_counter() - t0)
    return call


def stream_sample(t0: float, first: float | None, last: float, tokens: int) -> Sample:
    first = first or last
    return Sample(last - t0, first - t0, (last - first) / max(tokens - 1, 1))


def direct_generate(triton: service_pb2_grpc.GRPCInferenceServiceStub, max_tokens: int = MAX_TOKENS,
                    triton_model: str = "smollm2") -> Callable[[], Awaitable[Sample]]:
    builder = InferRequestBuilder(triton_model).add_bytes("messages", [json.dumps(PROMPT).encode()])
    request = builder.add_array("max_tokens", np.array([max_tokens], np.int32)).add_array(
        "temperature", np.array([0.0], np.float32)).build()

    async def call() -> Sample:
        return await triton_stream_sample(triton, request)
    return call


async def triton_stream_sample(triton: service_pb2_grpc.GRPCInferenceServiceStub,
                               request: service_pb2.ModelInferRequest) -> Sample:
    """One generation streamed straight from Triton: its latency, time to first text and time per token."""
    t0, first, tokens = time.perf_counter(), None, 0
    async for item in triton.ModelStreamInfer(iter([request]), timeout=120):
        if item.error_message:
            raise RuntimeError(item.error_message)
        outputs = output_arrays(item.infer_response)
        if outputs["text_output"].reshape(-1)[0] and first is None:
            first = time.perf_counter()
        tokens = int(outputs["completion_tokens"].reshape(-1)[0])
        if is_final_response(item.infer_response):
            break
    return stream_sample(t0, first, time.perf_counter(), tokens)


def mesh_generate(mesh: mesh_pb2_grpc.InferenceMeshStub, cached: bool = False, model: str = "smollm2-135m-instruct",
                  max_tokens: int = MAX_TOKENS, auth: tuple = AUTH) -> Callable[[], Awaitable[Sample]]:
    mode = mesh_pb2.CACHE_MODE_DEFAULT if cached else mesh_pb2.CACHE_MODE_BYPASS
    request = mesh_pb2.GenerateRequest(
        model=model, max_tokens=max_tokens, temperature=0.0, cache_mode=mode,
        messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=PROMPT[0]["content"])])

    async def call() -> Sample:
        t0, first, tokens = time.perf_counter(), None, 0
        async for chunk in mesh.Generate(request, metadata=auth, timeout=120):
            if chunk.text and first is None:
                first = time.perf_counter()
            if chunk.finish_reason:
                tokens = chunk.usage.completion_tokens
        return stream_sample(t0, first, time.perf_counter(), tokens)
    return call


async def measure(stack: LocalStack, concurrencies: list[int], embed_requests: int, stream_requests: int,
                  rounds: int) -> list[dict]:
    triton_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}")
    gateway_channel = grpc.aio.insecure_channel(stack.gateway_address)
    triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
    mesh = mesh_pb2_grpc.InferenceMeshStub(gateway_channel)
    paths = {
        "embed": {"direct": direct_embed(triton), "mesh": mesh_embed(mesh), "hit": mesh_embed(mesh, cached=True)},
        "generate": {"direct": direct_generate(triton), "mesh": mesh_generate(mesh),
                     "hit": mesh_generate(mesh, cached=True)},
    }
    for calls in paths.values():  # warm-up: connections, model caches
        for call in calls.values():
            await run_load(call, 2, 4)
    rows = []
    for kind, calls in paths.items():
        for concurrency in concurrencies:
            count = max(embed_requests if kind == "embed" else stream_requests * concurrency // 4, concurrency * 2)
            gathered: dict[str, tuple[list[Sample], float]] = {p: ([], 0.0) for p in calls}
            for turn in range(rounds):
                for path in ("direct", "mesh", "hit") if turn % 2 == 0 else ("hit", "mesh", "direct"):
                    samples, elapsed = await run_load(calls[path], concurrency, count // rounds)
                    gathered[path] = (gathered[path][0] + samples, gathered[path][1] + elapsed)
            for path, (samples, elapsed) in gathered.items():
                latencies = [s.latency_s * 1000 for s in samples]
                rows.append({
                    "kind": kind, "concurrency": concurrency, "path": path, "n": len(samples),
                    "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "rps": len(samples) / elapsed,
                    "ttft_p50_ms": pct([s.ttft_s * 1000 for s in samples], 50) if kind == "generate" else None,
                    "ttft_p99_ms": pct([s.ttft_s * 1000 for s in samples], 99) if kind == "generate" else None,
                    "tpot_ms": statistics.median(s.tpot_s * 1000 for s in samples) if kind == "generate" else None,
                })
            print(f"  {kind} c={concurrency} done", flush=True)
    await triton_channel.close()
    await gateway_channel.close()
    return rows


def render(rows: list[dict], command: str) -> str:
    def pair(kind: str, c: int) -> tuple[dict, dict, dict]:
        found = {r["path"]: r for r in rows if r["kind"] == kind and r["concurrency"] == c}
        return found["direct"], found["mesh"], found["hit"]

    concurrencies = sorted({r["concurrency"] for r in rows})
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {__import__('os').cpu_count()} cores, client, gateway, router and Triton "
        "on the same cores. Model instances: 1 per model (CPU).",
        "",
        "The mesh columns bypass the cache (same work as direct); the cache-hit columns send the same request",
        "again with the cache on, so they measure gateway → cache service → Redis.",
        "",
        "### Embed (1 text per request)",
        "",
        "| concurrency | direct p50 ms | mesh p50 ms | added p50 ms | direct p99 ms | mesh p99 ms | added p99 ms "
        "| direct req/s | mesh req/s | mesh/direct throughput | cache-hit p50 ms | cache-hit req/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrencies:
        d, m, h = pair("embed", c)
        lines.append(f"| {c} | {d['p50_ms']:.2f} | {m['p50_ms']:.2f} | {m['p50_ms'] - d['p50_ms']:+.2f} "
                     f"| {d['p99_ms']:.2f} | {m['p99_ms']:.2f} | {m['p99_ms'] - d['p99_ms']:+.2f} "
                     f"| {d['rps']:.0f} | {m['rps']:.0f} | {m['rps'] / d['rps']:.2f} "
                     f"| {h['p50_ms']:.2f} | {h['rps']:.0f} |")
    lines += [
        "",
        f"### Generate (streaming, {MAX_TOKENS} tokens, greedy)",
        "",
        "| concurrency | direct TTFT p50 ms | mesh TTFT p50 ms | added TTFT p50 ms | direct TTFT p99 ms "
        "| mesh TTFT p99 ms | direct ms/token | mesh ms/token | mesh/direct ms/token | cache-hit whole stream p50 ms "
        "| direct whole stream p50 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrencies:
        d, m, h = pair("generate", c)
        lines.append(f"| {c} | {d['ttft_p50_ms']:.1f} | {m['ttft_p50_ms']:.1f} | "
                     f"{m['ttft_p50_ms'] - d['ttft_p50_ms']:+.1f} | {d['ttft_p99_ms']:.1f} | {m['ttft_p99_ms']:.1f} "
                     f"| {d['tpot_ms']:.2f} | {m['tpot_ms']:.2f} | {m['tpot_ms'] / d['tpot_ms']:.2f} "
                     f"| {h['p50_ms']:.1f} | {d['p50_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(markdown: str, title: str, heading: str = "Inference path: direct Triton vs mesh") -> None:
    path = ROOT / "BENCHMARKS.md"
    begin, end = f"<!-- {title}:begin -->", f"<!-- {title}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown}{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--embed-requests", type=int, default=600)
    parser.add_argument("--stream-requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    stack = LocalStack(ROOT / "build" / "bench", StackPorts.free(1, gateways=1), with_edge=False)
    stack.start()
    try:
        rows = asyncio.run(measure(stack, args.concurrency, args.embed_requests, args.stream_requests, args.rounds))
    finally:
        stack.stop()
    markdown = render(rows, "make bench")
    print(markdown)
    if not args.no_write:
        write_section(markdown, "inference-path")


if __name__ == "__main__":
    main()

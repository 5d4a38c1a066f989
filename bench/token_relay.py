"""What the mesh costs per streamed token when the engine is not the bottleneck (issue 33). The TensorRT-LLM path
(the BLS `generate` model over the `tensorrt_llm` stand-in) runs with the stand-in in its fast mode: no compute,
the tokens of a fixed sentence as fast as the loop turns (MESH_STANDIN_FAST_TOKENS_PER_S=0), every request at
once. The same streams then go three ways in one run: to Triton directly (KServe ModelStreamInfer to the BLS
model), to one gateway (InferenceMesh/Generate, cache off), and through Envoy (TLS, API key, rate limit).

Per path and number of concurrent streams: tokens/s, CPU µs per token of every process (from /proc), time to
first token p50 and the inter-token gap p99 seen by the client. Prints tables, draws docs/bench-token-relay.png
and rewrites its section of BENCHMARKS.md.

    python -m bench.token_relay [--streams 1 4 16 64 256] [--tokens 64] [--no-write]

Targets (issue 33), at 64 streams: mesh CPU per token <= 150 µs in total; one router >= 15,000 tokens/s and one
gateway >= 10,000 tokens/s; TTFT added <= 2 ms p50; inter-token gap p99 added <= 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH, bench_tenants
from bench.inference_path import ROOT, pct, run_load, write_section
from bench.profile_hot_path import cpu_seconds
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.common.kserve import InferRequestBuilder, is_final_response, output_arrays
from tools.fill_trtllm import STANDIN, TrtllmPools, write
from tools.stack import LocalStack, StackPorts
from tools.triton import MODEL_REPOSITORY, REGISTRY_FILE

IMAGE = "docs/bench-token-relay.png"
MODEL = TrtllmPools.load().model.triton_name
PROMPT = "Tell me about the mesh."
# The processes a token passes through (the rest, e.g. Redis, are read too and shown when they spend anything).
MESH_PROCESSES = ("envoy", "gateway", "router")


@dataclass
class Streamed:
    tokens: int
    ttft_s: float
    gaps_s: list[float] = field(default_factory=list)


async def _timed(chunks: AsyncIterator, tokens_of: Callable[[object], int | None]) -> Streamed:
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    async for chunk in chunks:
        now = time.perf_counter()
        count = tokens_of(chunk)
        if count is None:
            continue
        if first is None:
            first = now
        elif last is not None:
            gaps.append(now - last)
        last = now
        tokens = max(tokens, count)
    return Streamed(tokens, (first or time.perf_counter()) - t0, gaps)


def triton_stream(stub: service_pb2_grpc.GRPCInferenceServiceStub, max_tokens: int) -> Callable:
    request = InferRequestBuilder(MODEL).add_bytes("messages", [json.dumps(
        [{"role": "user", "content": PROMPT}]).encode()]).add_array(
        "max_tokens", np.array([max_tokens], np.int32)).add_array(
        "temperature", np.array([0.0], np.float32)).build()

    def tokens_of(item) -> int | None:
        if item.error_message:
            raise RuntimeError(item.error_message)
        outputs = output_arrays(item.infer_response)
        if not outputs["text_output"].reshape(-1)[0] and not is_final_response(item.infer_response):
            return None
        return int(outputs["completion_tokens"].reshape(-1)[0])

    async def call() -> Streamed:
        return await _timed(stub.ModelStreamInfer(iter([request]), timeout=300), tokens_of)
    return call


def mesh_stream(stub: mesh_pb2_grpc.InferenceMeshStub, max_tokens: int) -> Callable:
    request = mesh_pb2.GenerateRequest(model=MODEL, max_tokens=max_tokens, temperature=0.0,
                                       cache_mode=mesh_pb2.CACHE_MODE_BYPASS,
                                       messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=PROMPT)])
    def tokens_of(chunk) -> int | None:
        if chunk.finish_reason:
            return chunk.usage.completion_tokens
        return 0 if chunk.text else None

    async def call() -> Streamed:
        return await _timed(stub.Generate(request, metadata=AUTH, timeout=300), tokens_of)
    return call


async def measure(stack: LocalStack, streams_list: list[int], max_tokens: int, tokens_per_point: int) -> list[dict]:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    channels = {"triton": grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}"),
                "gateway": grpc.aio.insecure_channel(stack.gateway_address),
                "edge": grpc.aio.secure_channel(stack.edge_address, credentials)}
    calls = {"triton": triton_stream(service_pb2_grpc.GRPCInferenceServiceStub(channels["triton"]), max_tokens),
             "gateway": mesh_stream(mesh_pb2_grpc.InferenceMeshStub(channels["gateway"]), max_tokens),
             "edge": mesh_stream(mesh_pb2_grpc.InferenceMeshStub(channels["edge"]), max_tokens)}
    pids = {name: process.pid for name, process in stack.processes.items()}
    rows = []
    try:
        for call in calls.values():
            await run_load(call, 4, 8)  # warm: connections, the BLS model's first requests
        for streams in streams_list:
            requests = max(streams, -(-tokens_per_point // max_tokens))
            for path, call in calls.items():
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                done, seconds = await run_load(call, streams, requests)
                tokens = sum(s.tokens for s in done)
                cpu_us = {name: (cpu_seconds(pid) - before[name]) * 1e6 / max(tokens, 1) for name, pid in pids.items()}
                rows.append({"path": path, "streams": streams, "tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds, "cpu_us": cpu_us,
                             "ttft_p50_ms": pct([s.ttft_s for s in done], 50) * 1000,
                             "gap_p99_ms": pct([g for s in done for g in s.gaps_s], 99) * 1000})
                print(f"{path:8} {streams:4} streams: {tokens / seconds:8.0f} tokens/s", flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
    return rows


def render(rows: list[dict], max_tokens: int) -> str:
    by = {(r["path"], r["streams"]): r for r in rows}
    streams_list = sorted({r["streams"] for r in rows})
    processes = [p for p in (*MESH_PROCESSES, "triton-0", "ratelimit")
                 if any(r["cpu_us"].get(p, 0) > 1 for r in rows)]
    lines = ["Command: `make bench` (bench/token_relay.py)  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores shared by every process and the client. Engine: "
             f"the TensorRT-LLM stand-in in its fast mode (no compute) under the BLS model; {max_tokens}-token "
             "greedy streams, cache off.", "", f"![tokens/s against concurrent streams]({IMAGE})", "",
             "| streams | direct Triton tokens/s | gateway tokens/s | edge tokens/s | edge / direct | TTFT p50 ms "
             "(direct / edge) | gap p99 ms (direct / edge) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in streams_list:
        t, g, e = by[("triton", n)], by[("gateway", n)], by[("edge", n)]
        lines.append(f"| {n} | {t['tokens_per_s']:.0f} | {g['tokens_per_s']:.0f} | {e['tokens_per_s']:.0f} "
                     f"| {e['tokens_per_s'] / t['tokens_per_s']:.2f} | {t['ttft_p50_ms']:.1f} / {e['ttft_p50_ms']:.1f} "
                     f"| {t['gap_p99_ms']:.1f} / {e['gap_p99_ms']:.1f} |")
    lines += ["", "CPU µs per token by process, through the edge (Triton's is the same work on every path; the direct "
              "path's row says what Triton alone spends):", "",
              "| streams | " + " | ".join(processes) + " | mesh (Envoy + gateway + router) | direct: triton |",
              "|---:|" + "---:|" * (len(processes) + 2)]
    for n in streams_list:
        e, t = by[("edge", n)], by[("triton", n)]
        mesh = sum(e["cpu_us"].get(p, 0.0) for p in MESH_PROCESSES)
        lines.append(f"| {n} | " + " | ".join(f"{e['cpu_us'].get(p, 0.0):.0f}" for p in processes)
                     + f" | {mesh:.0f} | {t['cpu_us'].get('triton-0', 0.0):.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, label in (("triton", "direct Triton"), ("gateway", "one gateway"), ("edge", "through Envoy")):
        points = sorted((r["streams"], r["tokens_per_s"]) for r in rows if r["path"] == name)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("tokens/s")
    axis.set_title("Token relay with an engine that computes nothing")
    axis.legend()
    figure.tight_layout()
    figure.savefig(ROOT / path, dpi=110)


def relay_stack(root: Path) -> LocalStack:
    """The TensorRT-LLM repository with the stand-in, one gateway, the edge; no cache, no retrieval."""
    write(root / "repository", standin=True)
    repository = root / "repository" / STANDIN
    (repository / "smollm2").symlink_to(MODEL_REPOSITORY / "smollm2")
    registry = yaml.safe_load(REGISTRY_FILE.read_text())
    cpu = next(spec for spec in registry["models"].values() if spec["kind"] == "generate")
    registry["models"] = {MODEL: {**cpu, "triton_model": MODEL, "max_output_tokens": 512, "pools": ["cpu"],
                                  "context_tokens": TrtllmPools.load().standin.max_seq_len}}
    registry["groups"] = {}
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    return LocalStack(root / "run", StackPorts.free(1, gateways=1), tenants_file=bench_tenants(root / "tenants.yaml"),
                      registry_file=root / "registry.yaml", model_repository=repository,
                      with_cache=False, with_retrieval=False,
                      # One tenant sends every stream: its share of the gateway is the whole of it here.
                      service_env={"gateway": {"MESH_GATEWAY_TENANT_SHARE_OF_IN_FLIGHT": "1.0"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--tokens-per-point", type=int, default=8192)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ["MESH_STANDIN_FAST_TOKENS_PER_S"] = "0"  # Triton inherits it: the stand-in computes nothing
    with tempfile.TemporaryDirectory(prefix="mesh-token-relay-") as scratch:
        stack = relay_stack(Path(scratch))
        stack.start()
        try:
            rows = asyncio.run(measure(stack, args.streams, args.tokens, args.tokens_per_point))
        finally:
            stack.stop()
    markdown = render(rows, args.tokens)
    print(markdown)
    if not args.no_write:
        plot(rows, IMAGE)
        write_section(markdown, "token-relay", "Token relay: what the mesh costs per streamed token")


if __name__ == "__main__":
    main()

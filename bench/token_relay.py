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
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml
from google.protobuf.duration_pb2 import Duration
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH, bench_tenants
from bench.hot_path import baseline_tree
from bench.inference_path import ROOT, pct, run_load, write_section
from bench.profile_hot_path import cpu_seconds
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, quota_pb2, quota_pb2_grpc, router_pb2, router_pb2_grpc
from services.common.kserve import InferRequestBuilder, is_final_response, output_arrays
from tools.fill_trtllm import STANDIN, TrtllmPools, write
from tools.stack import LocalStack, StackPorts
from tools.triton import MODEL_REPOSITORY, REGISTRY_FILE

IMAGE = "docs/bench-token-relay.png"
# The last commit before issue 33 cut the relay's per-token cost.
BASELINE = "9d169f5"
MODEL = TrtllmPools.load().model.triton_name
PROMPT = "Tell me about the mesh."
# The processes a token passes through (the rest, e.g. Redis, are read too and shown when they spend anything).
MESH_PROCESSES = ("envoy", "gateway", "router")


@dataclass
class Streamed:
    tokens: int
    ttft_s: float
    gaps_s: list[float] = field(default_factory=list)
    messages: int = 0


async def _timed(chunks: AsyncIterator, tokens_of: Callable[[object], int | None]) -> Streamed:
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = messages = 0
    async for chunk in chunks:
        messages += 1
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
    return Streamed(tokens, (first or time.perf_counter()) - t0, gaps, messages)


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


@dataclass
class RelayStack:
    """One stack under test and its clients' calls by path."""

    name: str
    stack: LocalStack
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    calls: dict[str, Callable] = field(default_factory=dict)

    def open(self, max_tokens: int, paths: tuple[str, ...]) -> None:
        credentials = grpc.ssl_channel_credentials(self.stack.pki.ca_cert.read_bytes())
        self.channels = {"triton": grpc.aio.insecure_channel(f"127.0.0.1:{self.stack.ports.tritons[0].grpc}"),
                         "gateway": grpc.aio.insecure_channel(self.stack.gateway_address),
                         "edge": grpc.aio.secure_channel(self.stack.edge_address, credentials)}
        makers = {"triton": lambda c: triton_stream(service_pb2_grpc.GRPCInferenceServiceStub(c), max_tokens),
                  "gateway": lambda c: mesh_stream(mesh_pb2_grpc.InferenceMeshStub(c), max_tokens),
                  "edge": lambda c: mesh_stream(mesh_pb2_grpc.InferenceMeshStub(c), max_tokens)}
        self.calls = {path: makers[path](self.channels[path]) for path in paths}

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


async def measure(stacks: list[RelayStack], streams_list: list[int], max_tokens: int,
                  tokens_per_point: int) -> list[dict]:
    """Every path of every stack at each number of streams, the stacks taking turns so drift hits both alike."""
    rows = []
    for relay in stacks:
        for call in relay.calls.values():
            await run_load(call, 4, 8)  # warm: connections, the BLS model's first requests
    for streams in streams_list:
        requests = max(streams, -(-tokens_per_point // max_tokens))
        for relay in stacks:
            pids = {name: process.pid for name, process in relay.stack.processes.items()}
            for path, call in relay.calls.items():
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                done, seconds = await run_load(call, streams, requests)
                tokens = sum(s.tokens for s in done)
                cpu_us = {name: (cpu_seconds(pid) - before[name]) * 1e6 / max(tokens, 1) for name, pid in pids.items()}
                rows.append({"stack": relay.name, "path": path, "streams": streams, "tokens": tokens,
                             "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_us": cpu_us,
                             "tokens_per_message": tokens / max(sum(s.messages for s in done), 1),
                             "ttft_p50_ms": pct([s.ttft_s for s in done], 50) * 1000,
                             "gap_p99_ms": pct([g for s in done for g in s.gaps_s], 99) * 1000})
                print(f"{relay.name:8} {path:8} {streams:4} streams: {tokens / seconds:8.0f} tokens/s", flush=True)
    return rows


async def hop_round_trips(stack: LocalStack, rounds: int = 200) -> dict[str, float]:
    """What the gateway waits on before it calls the engine, one call at a time on an idle stack (ms, p50): the
    token budget's reservation at the rate-limit service and the router's lease up to its grant."""
    tenant = (("x-mesh-tenant", "bench"),)
    async with grpc.aio.insecure_channel(stack.ratelimit_address) as budgets, \
            grpc.aio.insecure_channel(stack.router_address) as router:
        budget = quota_pb2_grpc.TokenBudgetStub(budgets)
        leases = router_pb2_grpc.PlacementLeasesStub(router)

        async def reserve() -> None:
            await budget.Reserve(quota_pb2.BudgetReserveRequest(tenant="bench", tokens=1, ttl=Duration(seconds=5)),
                                 timeout=10)

        async def grant() -> None:
            call = leases.Lease(timeout=10, metadata=tenant)
            await call.write(router_pb2.LeaseReport(ask=router_pb2.LeaseAsk(model=MODEL)))
            await call.read()
            await call.write(router_pb2.LeaseReport(outcome=router_pb2.AttemptReport()))
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass

        found = {}
        for name, step in (("budget reservation", reserve), ("lease grant", grant)):
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await step()
                times.append(time.perf_counter() - t0)
            found[name] = pct(times, 50) * 1000
    return found


def render(rows: list[dict], max_tokens: int, baseline: str, hops: dict[str, float] | None = None) -> str:
    by = {(r["stack"], r["path"], r["streams"]): r for r in rows}
    streams_list = sorted({r["streams"] for r in rows})
    processes = [p for p in (*MESH_PROCESSES, "triton-0", "ratelimit")
                 if any(r["cpu_us"].get(p, 0) > 1 for r in rows)]
    lines = ["Command: `make bench` (bench/token_relay.py)  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores shared by every process and the client. Engine: "
             f"the TensorRT-LLM stand-in in its fast mode (no compute) under the BLS model; {max_tokens}-token "
             f"greedy streams, cache off. Before: gateway, router and BLS model from `{baseline}` (the commit "
             "before issue 33's cuts; the router relayed every token), beside this tree's (the router places each "
             "stream on a lease and the tokens flow Triton -> gateway), in the same run; Envoy, Triton, the "
             "stand-in engine and the rest are this tree's in both.", "",
             f"![tokens/s against concurrent streams]({IMAGE})", "",
             "| streams | direct Triton tokens/s | gateway tokens/s (before / after) | edge tokens/s (before / after) "
             "| edge / direct (after) | tokens per message at the client (edge before / after) "
             "| TTFT p50 ms (direct / gateway after / edge before / after) "
             "| gap p99 ms (direct / gateway after / edge before / after) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in streams_list:
        t = by[("current", "triton", n)]
        gb, ga = by[("baseline", "gateway", n)], by[("current", "gateway", n)]
        eb, ea = by[("baseline", "edge", n)], by[("current", "edge", n)]
        lines.append(f"| {n} | {t['tokens_per_s']:.0f} | {gb['tokens_per_s']:.0f} / {ga['tokens_per_s']:.0f} "
                     f"| {eb['tokens_per_s']:.0f} / {ea['tokens_per_s']:.0f} "
                     f"| {ea['tokens_per_s'] / t['tokens_per_s']:.2f} "
                     f"| {eb['tokens_per_message']:.2f} / {ea['tokens_per_message']:.2f} "
                     f"| {t['ttft_p50_ms']:.1f} / {ga['ttft_p50_ms']:.1f} / {eb['ttft_p50_ms']:.1f} "
                     f"/ {ea['ttft_p50_ms']:.1f} "
                     f"| {t['gap_p99_ms']:.1f} / {ga['gap_p99_ms']:.1f} / {eb['gap_p99_ms']:.1f} "
                     f"/ {ea['gap_p99_ms']:.1f} |")
    lines += ["", "CPU µs per token by process, through the edge, before / after (Triton's is the same work on every "
              "path; the direct path's column says what Triton alone spends):", "",
              "| streams | " + " | ".join(processes) + " | mesh (Envoy + gateway + router) | after / before "
              "| direct: triton |", "|---:|" + "---:|" * (len(processes) + 3)]
    for n in streams_list:
        eb, ea, t = by[("baseline", "edge", n)], by[("current", "edge", n)], by[("current", "triton", n)]
        mesh_b = sum(eb["cpu_us"].get(p, 0.0) for p in MESH_PROCESSES)
        mesh_a = sum(ea["cpu_us"].get(p, 0.0) for p in MESH_PROCESSES)
        lines.append(f"| {n} | " + " | ".join(f"{eb['cpu_us'].get(p, 0.0):.0f} / {ea['cpu_us'].get(p, 0.0):.0f}"
                                              for p in processes)
                     + f" | {mesh_b:.0f} / {mesh_a:.0f} | {mesh_a / mesh_b:.2f} "
                     f"| {t['cpu_us'].get('triton-0', 0.0):.0f} |")
    if hops:
        lines += ["", "What a gateway waits on before it calls the engine, one call at a time on the idle stack after "
                  "the load (p50 of 200 round trips from this process; the lease's includes the report and the "
                  "call's end): " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in hops.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for stack, name, label in (("current", "triton", "direct Triton"), ("current", "gateway", "one gateway"),
                               ("current", "edge", "through Envoy"), ("baseline", "edge", "through Envoy, before")):
        points = sorted((r["streams"], r["tokens_per_s"]) for r in rows if r["path"] == name and r["stack"] == stack)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                  linestyle="--" if stack == "baseline" else "-")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("tokens/s")
    axis.set_title("Token relay with an engine that computes nothing")
    axis.legend()
    figure.tight_layout()
    figure.savefig(ROOT / path, dpi=110)


def relay_stack(root: Path, code: Path | None = None) -> LocalStack:
    """The TensorRT-LLM repository with the stand-in in its fast mode, one gateway, the edge; no cache, no
    retrieval. With `code`, the gateway, the router and the BLS model run that tree's code (the before of a
    before/after)."""
    pools = TrtllmPools.load()
    # The stand-in's queue is sized for the tests' overload cases (4); here it queues like a GPU pool's, so that
    # 256 streams wait for their turn instead of being refused.
    pools.standin = pools.standin.model_copy(update={"max_queue_size": 1024, "max_batch_size": 64})
    write(root / "repository", standin=True, pools=pools)
    repository = root / "repository" / STANDIN
    (repository / "smollm2").symlink_to(MODEL_REPOSITORY / "smollm2")
    if code is not None:  # the BLS model's code from that tree too (the stand-in engine is this tree's in both)
        bls = repository / MODEL / "1"
        for path in bls.glob("*.py"):
            path.unlink()
        for path in (code / "triton_models" / "trtllm" / "generate" / "1").glob("*.py"):
            (bls / path.name).write_text(path.read_text())
    registry = yaml.safe_load(REGISTRY_FILE.read_text())
    cpu = next(spec for spec in registry["models"].values() if spec["kind"] == "generate")
    registry["models"] = {MODEL: {**cpu, "triton_model": MODEL, "max_output_tokens": 512, "pools": ["cpu"],
                                  "context_tokens": TrtllmPools.load().standin.max_seq_len}}
    registry["groups"] = {}
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    # One tenant sends every stream: its share of the gateway is the whole of it here.
    gateway_env = {"MESH_GATEWAY_TENANT_SHARE_OF_IN_FLIGHT": "1.0"}
    router_env: dict[str, str] = {}
    if code is not None:
        # PYTHONSAFEPATH: the working directory (this tree) is not put before PYTHONPATH (that tree).
        other = {"PYTHONPATH": f"{code}:{code / 'gen'}", "PYTHONSAFEPATH": "1"}
        gateway_env |= other
        router_env |= other
    return LocalStack(root / "run", StackPorts.free(1, gateways=1), tenants_file=bench_tenants(root / "tenants.yaml"),
                      registry_file=root / "registry.yaml", model_repository=repository,
                      with_cache=False, with_retrieval=False,
                      service_env={"gateway": gateway_env, "router": router_env,
                                   # The stand-in computes nothing and streams as fast as its loop turns.
                                   "triton": {"MESH_STANDIN_FAST_TOKENS_PER_S": "0"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--tokens-per-point", type=int, default=8192)
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose gateway and router are the before")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    root = ROOT / "build" / "bench-token-relay"  # kept after the run: the services' logs are there
    shutil.rmtree(root, ignore_errors=True)
    tree = baseline_tree(args.baseline, root / "baseline-tree")
    stacks = [RelayStack("baseline", relay_stack(root / "baseline", tree)),
              RelayStack("current", relay_stack(root / "current"))]

    hops: dict[str, float] = {}

    async def run() -> list[dict]:
        stacks[0].open(args.tokens, ("gateway", "edge"))  # direct Triton is the same code in both
        stacks[1].open(args.tokens, ("triton", "gateway", "edge"))
        try:
            rows = await measure(stacks, args.streams, args.tokens, args.tokens_per_point)
            hops.update(await hop_round_trips(stacks[1].stack))
            return rows
        finally:
            for relay in stacks:
                await relay.close()
    try:
        for relay in stacks:
            relay.stack.start()
        rows = asyncio.run(run())
    finally:
        for relay in stacks:
            relay.stack.stop()
    markdown = render(rows, args.tokens, args.baseline, hops)
    print(markdown)
    if not args.no_write:
        plot(rows, IMAGE)
        write_section(markdown, "token-relay", "Token relay: what the mesh costs per streamed token")


if __name__ == "__main__":
    main()

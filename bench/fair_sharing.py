"""A quiet tenant beside a flooder on a saturated replica: its time to first token alone, beside the flooder with
first come, first served (the router's fair queuing off: requests wait in Triton's queue), and beside the flooder
with fair queuing, in one run on one stack (the router restarted between the two), with a plot.

Targets (issue 18): the quiet tenant's TTFT p99 beside the flooder at least 5x lower than with FIFO and within
1.5x of the floor a non-preemptive replica allows (its TTFT alone plus the time to finish one generation already
running); total throughput within 5% of FIFO.

    python -m bench.fair_sharing [--flooders 8 --quiet-requests 12]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import time
from pathlib import Path

import grpc
import yaml

from bench.inference_path import ROOT, pct, write_section
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tools.stack import LocalStack, StackPorts

KEYS = {"quiet": "bench-quiet-key", "flood": "bench-flood-key"}
MODEL = "smollm2-135m-instruct"
PLOT = ROOT / "docs" / "bench-fair-sharing.png"


def tenants(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "tiers": {"bench": {"requests_per_minute": 1_000_000, "burst": 100_000}},
        "tenants": [{"id": name, "tier": "bench", "api_key_sha256": [hashlib.sha256(k.encode()).hexdigest()]}
                    for name, k in KEYS.items()]}))
    return path


def request(text: str, max_tokens: int) -> mesh_pb2.GenerateRequest:
    return mesh_pb2.GenerateRequest(model=MODEL, max_tokens=max_tokens, temperature=0.9,
                                    cache_mode=mesh_pb2.CACHE_MODE_BYPASS,
                                    messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=text)])


async def generation(mesh: mesh_pb2_grpc.InferenceMeshStub, tenant: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, tokens)."""
    started, first, tokens = time.perf_counter(), 0.0, 0
    async for chunk in mesh.Generate(request("Tell me about the sea.", max_tokens),
                                     metadata=(("x-api-key", KEYS[tenant]),), timeout=300):
        if chunk.text and not first:
            first = time.perf_counter() - started
        if chunk.finish_reason:
            tokens = chunk.usage.completion_tokens
    return first, time.perf_counter() - started, tokens


async def phase(mesh: mesh_pb2_grpc.InferenceMeshStub, flooders: int, quiet_requests: int,
                max_tokens: int) -> dict:
    """The quiet tenant's sequential requests, with `flooders` of the flooder's requests always outstanding."""
    stop = asyncio.Event()
    flood: list[tuple[float, float, int]] = []

    async def flooder() -> None:
        while not stop.is_set():
            flood.append(await generation(mesh, "flood", max_tokens))

    tasks = [asyncio.create_task(flooder()) for _ in range(flooders)]
    await asyncio.sleep(2.0 if flooders else 0.0)  # the flooder's queue is full before the quiet tenant asks
    quiet = []
    started = time.perf_counter()
    flood_before = len(flood)
    for _ in range(quiet_requests):
        quiet.append(await generation(mesh, "quiet", max_tokens))
        await asyncio.sleep(0.2)
    seconds = time.perf_counter() - started
    served = len(flood) - flood_before + len(quiet)
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ttft = [q[0] * 1000 for q in quiet]
    durations = [f[1] for f in flood] or [q[1] for q in quiet]
    return {"ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "ttft": ttft, "n": len(ttft),
            "generation_s": sum(durations) / len(durations), "requests_per_s": served / seconds}


async def measure(address: str, flooders: int, quiet_requests: int, max_tokens: int, phase_name: str) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        await generation(mesh, "quiet", max_tokens)  # warm
        return await phase(mesh, flooders if phase_name != "alone" else 0, quiet_requests, max_tokens)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(8, 3.4))
    labels = {"alone": "alone", "fifo": "beside a flooder, FIFO", "fair": "beside a flooder, fair queuing"}
    for index, name in enumerate(labels):
        values = sorted(results[name]["ttft"])
        axis.scatter(values, [index] * len(values), s=18, alpha=0.7)
        axis.plot([results[name]["ttft_p99"]] * 2, [index - 0.3, index + 0.3], color="black")
    axis.set_yticks(range(len(labels)), list(labels.values()))
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("quiet tenant's time to first token, ms (bar: p99)")
    axis.set_title("A quiet tenant on a saturated CPU replica", fontsize=10)
    figure.tight_layout()
    figure.savefig(PLOT, dpi=110)


def render(results: dict, flooders: int) -> str:
    alone, fifo, fair = results["alone"], results["fifo"], results["fair"]
    # One generation already running when the quiet request arrives: at most a whole generation alone.
    floor = alone["ttft_p99"] + alone["generation_s"] * 1000
    lines = [
        "Command: `python -m bench.fair_sharing` (part of `make bench`)  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; one Triton replica (llama.cpp, one generation at a "
        f"time); the flooder keeps {flooders} requests outstanding; the quiet tenant sends one at a time. Fair and "
        "FIFO: the same stack, the router restarted with `MESH_ROUTER_FAIR_QUEUING` on and off.",
        "",
        "| quiet tenant | TTFT p50 ms | TTFT p99 ms | requests | all requests/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("alone", "alone"), ("fifo", "beside the flooder, FIFO"),
                        ("fair", "beside the flooder, fair queuing")):
        r = results[name]
        lines.append(f"| {label} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {r['n']} | {r['requests_per_s']:.2f} |")
    gain = fifo["ttft_p99"] / fair["ttft_p99"]
    throughput = fair["requests_per_s"] / fifo["requests_per_s"]
    lines += [
        "",
        f"FIFO / fair TTFT p99: **{gain:.1f}x** (target ≥ 5x: {'met' if gain >= 5 else 'missed'}). Floor (alone p99 "
        f"+ one whole generation alone, {alone['generation_s'] * 1000:.0f} ms): {floor:.0f} ms; fair p99 / floor "
        f"**{fair['ttft_p99'] / floor:.2f}** (target ≤ 1.5: {'met' if fair['ttft_p99'] <= 1.5 * floor else 'missed'}). "
        f"Throughput fair / FIFO **{throughput:.2f}** (target: at most 5% below FIFO: "
        f"{'met' if throughput >= 0.95 else 'missed'}). Plot: [docs/bench-fair-sharing.png]"
        "(docs/bench-fair-sharing.png).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--quiet-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    run_dir = ROOT / "build" / "bench-fair-sharing"
    stack = LocalStack(run_dir, StackPorts.free(1, gateways=1), tenants_file=tenants(run_dir / "tenants.yaml"),
                       with_retrieval=False, with_cache=False)
    stack.start()
    results = {}
    try:
        for name in ("alone", "fair", "fifo"):
            if name == "fifo":
                stack.service_env["router"] = {"MESH_ROUTER_FAIR_QUEUING": "false"}
                stack.processes["router"].stop()
                stack.start_router()
            results[name] = asyncio.run(measure(stack.gateway_address, args.flooders, args.quiet_requests,
                                                args.max_tokens, name))
            print(name, {k: v for k, v in results[name].items() if k != "ttft"}, flush=True)
    finally:
        stack.stop()
    markdown = render(results, args.flooders)
    print(markdown)
    if not args.no_write:
        plot(results)
        write_section(markdown, "fair-sharing", "Fair sharing under overload: a quiet tenant beside a flooder")


if __name__ == "__main__":
    main()

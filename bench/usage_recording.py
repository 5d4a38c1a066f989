"""The hot path with usage recording on and off (services/admin/usage.py), in one run: two gateways of one stack,
the same in everything but MESH_GATEWAY_USAGE__ENABLED, measured in alternating rounds so that drift hits both
alike. Per gateway: the peak req/s of cache-hit Embed and of streamed cache-hit Generate (concurrency 64), and
its CPU per request; Triton called directly for the same embedding is the row they are read against.
Target: recording on keeps the cache-hit peak within 5% of off. Prints a table and rewrites its section of
BENCHMARKS.md.

    python -m bench.usage_recording [--rounds 4] [--requests 3000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import urllib.request

import grpc
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH, EMBED, REQUEST, bench_tenants, embed_hit, generate_hit
from bench.inference_path import ROOT, direct_embed, run_load, write_section
from bench.profile_hot_path import cpu_seconds
from inference_mesh.v1 import mesh_pb2_grpc
from tools.processes import free_port
from tools.stack import LocalStack, StackPorts

CONCURRENCY = 64


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def _peak(make, stub, requests: int, pid: int) -> tuple[float, float]:
    """(req/s, gateway CPU ms per request) at CONCURRENCY."""
    before = cpu_seconds(pid)
    got, seconds = await run_load(make(stub), CONCURRENCY, requests)
    return len(got) / seconds, (cpu_seconds(pid) - before) * 1000 / len(got)


async def measure(stack: LocalStack, off_address: str, off_pid: int, rounds: int, requests: int) -> dict:
    channels = {"on": grpc.aio.insecure_channel(stack.gateway_address), "off": grpc.aio.insecure_channel(off_address)}
    triton_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}")
    stubs = {name: mesh_pb2_grpc.InferenceMeshStub(channel) for name, channel in channels.items()}
    pids = {"on": stack.processes["gateway"].pid, "off": off_pid}
    triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
    results: dict[str, dict[str, list[float]]] = {name: {"embed": [], "embed_cpu": [], "generate": [],
                                                         "generate_cpu": []} for name in stubs}
    direct: list[float] = []
    try:
        async for _ in stubs["on"].Generate(REQUEST, metadata=AUTH, timeout=120):
            pass
        await stubs["on"].Embed(EMBED, metadata=AUTH, timeout=60)
        await asyncio.sleep(0.5)
        for stub in stubs.values():  # warm both
            await run_load(embed_hit(stub), 8, 200)
            await run_load(generate_hit(stub), 8, 100)
        written_before = _metric(stack.ports.gateway_metrics, "mesh_usage_records_written_total")
        for round_index in range(rounds):
            order = ("on", "off") if round_index % 2 == 0 else ("off", "on")
            for name in order:
                rate, cpu = await _peak(embed_hit, stubs[name], requests, pids[name])
                results[name]["embed"].append(rate)
                results[name]["embed_cpu"].append(cpu)
                rate, cpu = await _peak(generate_hit, stubs[name], requests // 2, pids[name])
                results[name]["generate"].append(rate)
                results[name]["generate_cpu"].append(cpu)
            got, seconds = await run_load(direct_embed(triton), 8, 300)
            direct.append(len(got) / seconds)
        await asyncio.sleep(1.5)  # one flush interval: every record of the on gateway written
        written = _metric(stack.ports.gateway_metrics, "mesh_usage_records_written_total") - written_before
        dropped = _metric(stack.ports.gateway_metrics, "mesh_usage_records_dropped_total")
    finally:
        for channel in (*channels.values(), triton_channel):
            await channel.close()
    summary = {name: {key: statistics.median(values) for key, values in series.items()}
               for name, series in results.items()}
    expected = rounds * (requests + requests // 2)
    return {"summary": summary, "direct_embed": statistics.median(direct), "written": written,
            "expected": expected, "dropped": dropped, "rounds": rounds, "requests": requests}


def render(result: dict) -> str:
    on, off = result["summary"]["on"], result["summary"]["off"]
    lines = [f"{time.strftime('%Y-%m-%d')}, 2 shared cores, one stack: two gateways alike but for usage recording, "
             f"called directly (no edge), concurrency {CONCURRENCY}, median of {result['rounds']} alternating "
             f"rounds of {result['requests']} Embed and {result['requests'] // 2} Generate cache hits each.", "",
             "| path | recording off | recording on | on / off |", "|---|---|---|---|"]
    for key, label, unit in (("embed", "cache-hit Embed peak", "req/s"), ("generate", "cache-hit Generate peak",
                                                                           "req/s"),
                             ("embed_cpu", "gateway CPU per Embed hit", "ms"),
                             ("generate_cpu", "gateway CPU per Generate hit", "ms")):
        lines.append(f"| {label} ({unit}) | {off[key]:.2f} | {on[key]:.2f} | {on[key] / off[key]:.3f} |")
    lines += ["", f"Triton directly, the same embedding computed (no cache), concurrency 8: "
              f"{result['direct_embed']:.0f} req/s. Records written by the recording gateway during the rounds: "
              f"{result['written']:.0f} of {result['expected']} requests (the rest of its "
              f"requests were the warm-up's), dropped: {result['dropped']:.0f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    root = ROOT / "build" / "bench-usage"
    stack = LocalStack(root / "run", StackPorts.free(1, gateways=1), tenants_file=bench_tenants(root / "tenants.yaml"),
                       with_edge=False, with_retrieval=False)
    stack.start()
    try:
        port, metrics = free_port(), free_port()
        env = {**stack.gateway_env(port, metrics), "MESH_GATEWAY_USAGE__ENABLED": "false"}
        off_address = stack.start_gateway_as("gateway-off", env)
        result = asyncio.run(measure(stack, off_address, stack.processes["gateway-off"].pid, args.rounds,
                                     args.requests))
    finally:
        stack.stop()
    markdown = render(result)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "usage-recording", "Usage recording: the hot path with records on and off")


if __name__ == "__main__":
    main()

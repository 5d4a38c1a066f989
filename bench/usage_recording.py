"""The hot path with usage recording on and off (services/admin/usage.py), in one run: three gateways of one stack
started alike but for MESH_GATEWAY_USAGE__ENABLED, on in one and off in two (the second off one is the
measurement's own noise floor), measured in rotating rounds so that drift hits all alike. Per gateway: the peak
req/s of cache-hit Embed and of streamed cache-hit Generate (concurrency 64), and its CPU per request; Triton
called directly for the same embedding is the row they are read against. Target: recording on keeps the
cache-hit peak within 5% of off. Prints a table and rewrites its section of BENCHMARKS.md.

    python -m bench.usage_recording [--rounds 10] [--requests 3000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH, EMBED, REQUEST, bench_tenants, embed_hit, generate_hit
from bench.inference_path import ROOT, direct_embed, run_load, write_section
from bench.profile_hot_path import cpu_seconds
from inference_mesh.v1 import mesh_pb2_grpc
from tools.metrics import metric_sum
from tools.processes import descendants, free_port
from tools.stack import LocalStack, StackPorts

CONCURRENCY = 64


def _cpu(pid: int) -> float:
    """The gateway's CPU and its children's (the recording gateway's usage sink): what recording costs in all."""
    return sum(cpu_seconds(p) for p in (pid, *descendants(pid)))


async def _peak(make, stub, requests: int, pid: int) -> tuple[float, float]:
    """(req/s, gateway CPU ms per request) at CONCURRENCY."""
    before = _cpu(pid)
    got, seconds = await run_load(make(stub), CONCURRENCY, requests)
    return len(got) / seconds, (_cpu(pid) - before) * 1000 / len(got)


GATEWAYS = {"on": "true", "off": "false", "off-again": "false"}


async def measure(addresses: dict[str, str], pids: dict[str, int], triton_address: str, metrics_port: int,
                  rounds: int, requests: int) -> dict:
    """Every round measures each gateway in turn (the order rotating) and keeps each one's ratio to `off` in
    that same round, so that drift between rounds cancels; `off-again` against `off` is the noise floor."""
    channels = {name: grpc.aio.insecure_channel(address) for name, address in addresses.items()}
    triton_channel = grpc.aio.insecure_channel(triton_address)
    stubs = {name: mesh_pb2_grpc.InferenceMeshStub(channel) for name, channel in channels.items()}
    triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
    series = ("embed", "embed_cpu", "generate", "generate_cpu")
    results: dict[str, dict[str, list[float]]] = {name: {key: [] for key in series} for name in stubs}
    direct: list[float] = []
    try:
        async for _ in stubs["on"].Generate(REQUEST, metadata=AUTH, timeout=120):
            pass
        await stubs["on"].Embed(EMBED, metadata=AUTH, timeout=60)
        await asyncio.sleep(0.5)
        for stub in stubs.values():  # warm every gateway alike
            await run_load(embed_hit(stub), 8, 300)
            await run_load(generate_hit(stub), 8, 150)
        written_before = metric_sum(metrics_port, "mesh_usage_records_written_total")
        names = list(stubs)
        for round_index in range(rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
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
        written = metric_sum(metrics_port, "mesh_usage_records_written_total") - written_before
        dropped = metric_sum(metrics_port, "mesh_usage_records_dropped_total")
    finally:
        for channel in (*channels.values(), triton_channel):
            await channel.close()
    summary = {name: {key: statistics.median(values) for key, values in by_key.items()}
               for name, by_key in results.items()}
    ratios = {name: {key: statistics.median(a / b for a, b in zip(results[name][key], results["off"][key], strict=True))
                     for key in series} for name in ("on", "off-again")}
    expected = rounds * (requests + requests // 2)
    return {"summary": summary, "ratios": ratios, "direct_embed": statistics.median(direct), "written": written,
            "expected": expected, "dropped": dropped, "rounds": rounds, "requests": requests}


def render(result: dict) -> str:
    summary, ratios = result["summary"], result["ratios"]
    lines = [f"{time.strftime('%Y-%m-%d')}, 2 shared cores, one stack: three gateways started alike, recording on "
             f"in one of them, called directly (no edge), concurrency {CONCURRENCY}; {result['rounds']} rounds, each "
             f"gateway in turn (order rotating), of {result['requests']} Embed and {result['requests'] // 2} "
             "Generate cache hits. Rates and CPU: medians over the rounds; ratios: the median of each round's "
             "ratio to `off` in that round. `off again` vs `off` is the noise floor of the measurement.", "",
             "| path | off | off again | on | off again / off | on / off |", "|---|---|---|---|---|---|"]
    for key, label, unit in (("embed", "cache-hit Embed peak", "req/s"),
                             ("generate", "cache-hit Generate peak", "req/s"),
                             ("embed_cpu", "gateway (+ usage sink) CPU per Embed hit", "ms"),
                             ("generate_cpu", "gateway (+ usage sink) CPU per Generate hit", "ms")):
        lines.append(f"| {label} ({unit}) | {summary['off'][key]:.2f} | {summary['off-again'][key]:.2f} | "
                     f"{summary['on'][key]:.2f} | {ratios['off-again'][key]:.3f} | {ratios['on'][key]:.3f} |")
    lines += ["", f"Triton directly, the same embedding computed (no cache), concurrency 8: "
              f"{result['direct_embed']:.0f} req/s. Records written by the recording gateway during the rounds: "
              f"{result['written']:.0f} of {result['expected']} requests (the rest of its "
              f"requests were the warm-up's), dropped: {result['dropped']:.0f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    root = ROOT / "build" / "bench-usage"
    stack = LocalStack(root / "run", StackPorts.free(1, gateways=1), tenants_file=bench_tenants(root / "tenants.yaml"),
                       with_edge=False, with_retrieval=False)
    stack.start()
    try:
        addresses, pids, metrics_ports = {}, {}, {}
        for name, enabled in GATEWAYS.items():
            port, metrics_ports[name] = free_port(), free_port()
            env = {**stack.gateway_env(port, metrics_ports[name]), "MESH_GATEWAY_USAGE__ENABLED": enabled}
            addresses[name] = stack.start_gateway_as(f"gateway-{name}", env)
            pids[name] = stack.processes[f"gateway-{name}"].pid
        result = asyncio.run(measure(addresses, pids, f"127.0.0.1:{stack.ports.tritons[0].grpc}",
                                     metrics_ports["on"], args.rounds, args.requests))
    finally:
        stack.stop()
    markdown = render(result)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "usage-recording", "Usage recording: the hot path with records on and off")


if __name__ == "__main__":
    main()

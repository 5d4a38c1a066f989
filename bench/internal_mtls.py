"""What internal mTLS costs on the cache-hit path: two stacks side by side, one with plaintext internal hops and
one with mTLS on all of them (Envoy → gateway and rate limits, gateway → cache and budgets), called through
Envoy in alternating rounds, in the same run. A direct Triton generation of the same request gives the scale.
Prints a table and rewrites its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH, EMBED, REQUEST, bench_tenants, embed_hit, generate_hit, summary
from bench.inference_path import ROOT, Sample, direct_generate, run_load, write_section
from inference_mesh.v1 import mesh_pb2_grpc
from tools.stack import LocalStack, StackPorts


async def measure(stacks: dict[str, LocalStack], concurrencies: list[int], requests: int, rounds: int) -> dict:
    channels = {name: grpc.aio.secure_channel(stack.edge_address,
                                              grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes()))
                for name, stack in stacks.items()}
    stubs = {name: mesh_pb2_grpc.InferenceMeshStub(channel) for name, channel in channels.items()}
    for stub in stubs.values():  # fill each stack's caches, then warm connections and handshakes
        async for _ in stub.Generate(REQUEST, metadata=AUTH, timeout=120):
            pass
        await stub.Embed(EMBED, metadata=AUTH, timeout=60)
    await asyncio.sleep(0.5)  # embeddings are stored in the background
    kinds = {"embed hit": embed_hit, "generate hit (32 chunks)": generate_hit}
    for make in kinds.values():
        for stub in stubs.values():
            await run_load(make(stub), 8, 100)
    rows = []
    for kind, make in kinds.items():
        for c in concurrencies:
            samples: dict[str, list[Sample]] = {name: [] for name in stubs}
            elapsed = dict.fromkeys(stubs, 0.0)
            for _ in range(rounds):  # alternating rounds: drift hits both stacks alike
                for name, stub in stubs.items():
                    got, seconds = await run_load(make(stub), c, requests // rounds)
                    samples[name] += got
                    elapsed[name] += seconds
            rows.append({"kind": kind, "concurrency": c,
                         **{name: summary(samples[name], elapsed[name]) for name in stubs}})
    plain = stacks["plaintext"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain.ports.tritons[0].grpc}") as triton:
        direct, _ = await run_load(direct_generate(service_pb2_grpc.GRPCInferenceServiceStub(triton)), 1, 10)
    for channel in channels.values():
        await channel.close()
    return {"rows": rows, "direct": summary(direct, 1.0)}


def render(results: dict) -> str:
    lines = ["Command: `make bench` (bench/internal_mtls.py). Two stacks, called through Envoy (TLS) in "
             "alternating rounds; internal hops plaintext in one, mTLS (P-256 certificates) in the other.", "",
             "| path | concurrency | plaintext p50 ms | mTLS p50 ms | mTLS / plaintext p50 | plaintext req/s "
             "| mTLS req/s | mTLS / plaintext req/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        plain, mtls = row["plaintext"], row["mtls"]
        lines.append(f"| {row['kind']} | {row['concurrency']} | {plain['p50']:.2f} | {mtls['p50']:.2f} "
                     f"| {mtls['p50'] / plain['p50']:.2f} | {plain['rps']:.0f} | {mtls['rps']:.0f} "
                     f"| {mtls['rps'] / plain['rps']:.2f} |")
    lines += ["", f"Direct Triton generation of the same request (32 tokens), p50: {results['direct']['p50']:.0f} ms."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    stacks: dict[str, LocalStack] = {}
    try:
        for name, internal_tls in (("plaintext", False), ("mtls", True)):
            run_dir = ROOT / "build" / f"bench-mtls-{name}"
            stacks[name] = LocalStack(run_dir, StackPorts.free(1, gateways=1), with_retrieval=False,
                                      tenants_file=bench_tenants(run_dir / "tenants.yaml"), internal_tls=internal_tls)
            stacks[name].start()
        results = asyncio.run(measure(stacks, args.concurrency, args.requests, args.rounds))
    finally:
        for stack in stacks.values():
            stack.stop()
    markdown = render(results)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "internal-mtls", "Internal mTLS on the cache-hit path")


if __name__ == "__main__":
    main()

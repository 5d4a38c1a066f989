"""The hot path against the commit before issue 17, in one run: two stacks side by side on this machine, one
from this tree and one from the baseline commit's tree (same virtual environments; hiredis hidden from the
baseline, which did not have it), measured in alternating rounds so that drift hits both alike.

Per stack: cache-hit Embed through Envoy (TLS, a rate-limit decision, least_request over 2 gateways) at
concurrency 1 and at its peak; the same straight to one gateway (so edge minus gateway is what Envoy and the
rate-limit call add); a streamed cache hit (32 tokens); Embed through the mesh with the cache bypassed against
the same stack's Triton directly (p50/p99 at concurrency 1, req/s at 32) and time to first token likewise; CPU
per cache hit by process, and each process's memory.

    make bench-hot-path            (or: python -m bench.hot_path --baseline ad4129c --rounds 3)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2_grpc

from bench.edge import AUTH, BENCH_KEY, EMBED, REQUEST, bench_tenants, embed_hit, generate_hit
from bench.inference_path import (
    ROOT,
    Sample,
    direct_embed,
    direct_generate,
    mesh_generate,
    pct,
    run_load,
    write_section,
)
from bench.profile_hot_path import cpu_seconds
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc

# The last commit before issue 17 changed the hot path (its profile and a reconnect fix are not on it).
BASELINE = "ad4129c"
PEAK_CONNECTIONS = 4
EMBED_BYPASS = mesh_pb2.EmbedRequest(model="all-minilm-l6-v2", texts=[EMBED.texts[0]],
                                     cache_mode=mesh_pb2.CACHE_MODE_BYPASS)

# Run inside a tree (the baseline's or this one): starts its LocalStack, prints where it listens, stops on EOF.
_CHILD = """
import json, sys
from pathlib import Path
from tools.stack import LocalStack, StackPorts
run_dir, tenants = Path(sys.argv[1]), Path(sys.argv[2])
stack = LocalStack(run_dir, StackPorts.free(1, gateways=2), tenants_file=tenants, with_retrieval=False)
stack.start()
try:
    print(json.dumps({"edge": stack.edge_address, "gateway": stack.gateway_address, "ca": str(stack.pki.ca_cert),
                      "triton": f"127.0.0.1:{stack.ports.tritons[0].grpc}",
                      "pids": {name: p.pid for name, p in stack.processes.items()}}), flush=True)
    sys.stdin.read()
finally:
    stack.stop()
"""


@dataclass
class StackHandle:
    name: str
    process: subprocess.Popen
    info: dict

    def stop(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def baseline_tree(revision: str, into: Path) -> Path:
    """The baseline commit's files, with this checkout's environments, models and (ignored) generated stubs."""
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    archive_path = into.parent / f"{into.name}.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into, filter="data")
    archive_path.unlink()
    for link in (".venv", ".venv-triton", "triton_models/minilm/1/model.onnx", "triton_models/minilm/1/tokenizer.json"):
        (into / link).symlink_to(ROOT / link)
    protos = sorted(str(p.relative_to(into / "protos")) for p in (into / "protos").rglob("*.proto"))
    (into / "gen").mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", "--python_out=gen",
                    "--grpc_python_out=gen", *protos], cwd=into, check=True)
    for package in ("gen/inference_mesh", "gen/inference_mesh/v1", "gen/inference_mesh/edge"):
        (into / package / "__init__.py").touch()
    # The baseline's services run with its tree first on PYTHONPATH: for a baseline without hiredis in its
    # requirements this makes `import hiredis` fail there, so redis-py parses replies in Python as it did then.
    if "hiredis" not in (into / "requirements" / "runtime.txt").read_text():
        (into / "hiredis.py").write_text("raise ImportError('hidden from the baseline stack')\n")
    return into


# One tenant drives the whole load: its share of a gateway's places (issue 30's fairness bound, 25%) would shed
# the peak passes, which measure the path, not fairness (bench/fair_sharing.py measures that).
_ONE_TENANT_ENV = {"MESH_GATEWAY_TENANT_SHARE_OF_IN_FLIGHT": "1.0"}


def start_stack(name: str, tree: Path, run_dir: Path, tenants: Path, extra_env: dict[str, str]) -> StackHandle:
    env = {**os.environ, **_ONE_TENANT_ENV, **extra_env, "PYTHONPATH": f"{tree}:{tree / 'gen'}"}
    process = subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir), str(tenants)], cwd=tree, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line:
        process.wait(30)
        raise RuntimeError(f"the {name} stack did not start (logs in {run_dir})")
    return StackHandle(name, process, json.loads(line))


class Probe:
    """One stack's channels and stubs."""

    def __init__(self, handle: StackHandle) -> None:
        info = handle.info
        credentials = grpc.ssl_channel_credentials(Path(info["ca"]).read_bytes())
        self.channels = [grpc.aio.secure_channel(info["edge"], credentials),
                         grpc.aio.insecure_channel(info["gateway"]), grpc.aio.insecure_channel(info["triton"])]
        # The peak load spreads over several connections, as a real load does: Envoy's local shield is a token
        # bucket per connection (1,000 requests/s), which one connection at the current peak would exceed.
        spread = [grpc.aio.secure_channel(info["edge"], credentials, options=[("grpc.use_local_subchannel_pool", 1)])
                  for _ in range(PEAK_CONNECTIONS)]
        self.channels += spread
        self.edge_spread = [mesh_pb2_grpc.InferenceMeshStub(channel) for channel in spread]
        self.edge = mesh_pb2_grpc.InferenceMeshStub(self.channels[0])
        self.gateway = mesh_pb2_grpc.InferenceMeshStub(self.channels[1])
        self.triton = service_pb2_grpc.GRPCInferenceServiceStub(self.channels[2])
        self.pids: dict[str, int] = info["pids"]

    async def refill(self) -> None:
        """The cached answer and vector the hit paths replay (embeddings live 5 minutes: a run is longer)."""
        async for _ in self.gateway.Generate(REQUEST, metadata=AUTH, timeout=120):
            pass
        await self.gateway.Embed(EMBED, metadata=AUTH, timeout=60)
        await asyncio.sleep(0.5)  # stored after the reply

    async def warm(self) -> None:
        await self.refill()
        for make in (embed_hit, generate_hit):
            for stub in (self.edge, self.gateway, *self.edge_spread):
                await run_load(make(stub), 8, 100)
        await run_load(direct_embed(self.triton), 4, 50)
        await run_load(mesh_generate(self.gateway, max_tokens=4, auth=AUTH), 1, 3)
        await run_load(direct_generate(self.triton, max_tokens=4), 1, 3)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def peak(probe: Probe, requests: int) -> float:
    """The highest req/s of cache-hit Embed through the edge at concurrency 64, 128 or 256 (as bench/edge.py)."""
    best = 0.0
    for concurrency in (64, 128, 256):
        calls = itertools.cycle([embed_hit(stub) for stub in probe.edge_spread])
        got, seconds = await run_load(lambda: next(calls)(), concurrency, requests)  # noqa: B023 - this pass only
        best = max(best, len(got) / seconds)
    return best


async def cpu_per_request(probe: Probe, concurrency: int, requests: int) -> tuple[float, dict[str, float]]:
    """req/s of cache-hit Embed through the edge, and each process's CPU ms per request meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in probe.pids.items()}
    client_before = time.process_time()
    calls = itertools.cycle([embed_hit(stub) for stub in probe.edge_spread])
    got, seconds = await run_load(lambda: next(calls)(), concurrency, requests)
    cpu = {name: (cpu_seconds(pid) - before[name]) * 1000 / len(got) for name, pid in probe.pids.items()}
    cpu["client (this benchmark)"] = (time.process_time() - client_before) * 1000 / len(got)
    return len(got) / seconds, cpu


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(probes: dict[str, Probe], rounds: int, scale: float) -> dict:
    for probe in probes.values():
        await probe.warm()
    n = lambda count: max(20, int(count * scale))  # noqa: E731
    kinds: dict[str, Callable[[Probe], tuple[Callable, int, int]]] = {
        "edge_c1": lambda p: (embed_hit(p.edge), 1, n(400)),
        "gateway_c1": lambda p: (embed_hit(p.gateway), 1, n(400)),
        "stream_edge_c1": lambda p: (generate_hit(p.edge), 1, n(200)),
        "stream_edge_c64": lambda p: (spread(generate_hit, p.edge_spread), 64, n(1500)),
        "mesh_embed_c1": lambda p: (embed_hit_bypass(p.gateway), 1, n(300)),
        "triton_embed_c1": lambda p: (direct_embed(p.triton), 1, n(300)),
        "mesh_embed_c32": lambda p: (embed_hit_bypass(p.gateway), 32, n(1200)),
        "triton_embed_c32": lambda p: (direct_embed(p.triton), 32, n(1200)),
        "mesh_ttft": lambda p: (mesh_generate(p.gateway, max_tokens=4, auth=AUTH), 1, max(5, n(30))),
        "triton_ttft": lambda p: (direct_generate(p.triton, max_tokens=4), 1, max(5, n(30))),
    }
    samples = {name: {kind: [] for kind in kinds} for name in probes}
    elapsed = {name: dict.fromkeys(kinds, 0.0) for name in probes}
    peaks: dict[str, list[float]] = {name: [] for name in probes}
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in probes}
    for _ in range(rounds):
        for probe in probes.values():
            await probe.refill()
        for kind, make in kinds.items():
            for name, probe in probes.items():
                call, concurrency, count = make(probe)
                got, seconds = await run_load(call, concurrency, count)
                samples[name][kind] += got
                elapsed[name][kind] += seconds
        for name, probe in probes.items():
            await probe.refill()
            _, per_process = await cpu_per_request(probe, 64, n(4000))
            cpu[name].append(per_process)
            peaks[name].append(await peak(probe, n(2000)))
    results: dict = {}
    for name in probes:
        rows = {}
        for kind in kinds:
            ms = [(s.ttft_s if kind.endswith("ttft") else s.latency_s) * 1000 for s in samples[name][kind]]
            rows[kind] = {"p50": pct(ms, 50), "p99": pct(ms, 99), "rps": len(ms) / elapsed[name][kind]}
        processes = cpu[name][0].keys()
        results[name] = {
            "rows": rows, "peak": max(peaks[name]), "peaks": peaks[name],
            "cpu": {p: sum(c[p] for c in cpu[name]) / len(cpu[name]) for p in processes},
            "rss": {p: rss_mib(pid) for p, pid in probes[name].pids.items()},
        }
    return results


def spread(make: Callable, stubs: list[mesh_pb2_grpc.InferenceMeshStub]) -> Callable[[], Awaitable[Sample]]:
    calls = itertools.cycle([make(stub) for stub in stubs])
    return lambda: next(calls)()


def embed_hit_bypass(mesh: mesh_pb2_grpc.InferenceMeshStub) -> Callable[[], Awaitable[Sample]]:
    """Embed through the mesh with the cache bypassed: gateway, router, Triton."""
    async def call() -> Sample:
        t0 = time.perf_counter()
        await mesh.Embed(EMBED_BYPASS, metadata=AUTH, timeout=30)
        return Sample(time.perf_counter() - t0)
    return call


def render(results: dict, baseline: str, rounds: int) -> str:
    before, after = results["baseline"], results["current"]

    def row(label: str, value: Callable[[dict], float], unit: str, fmt: str = "{:.2f}") -> str:
        b, a = value(before), value(after)
        ratio = a / b if b else float("nan")
        return f"| {label} | {fmt.format(b)} {unit} | {fmt.format(a)} {unit} | {ratio:.2f}x |"

    r = lambda kind, field: (lambda res: res["rows"][kind][field])  # noqa: E731
    added = lambda kind, field: (lambda res: res["rows"][f"mesh_{kind}"][field]  # noqa: E731
                                 - res["rows"][f"triton_{kind}"][field])
    lines = [
        "Command: `make bench-hot-path` (bench/hot_path.py)  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared by both stacks and the client. Baseline: "
        f"`{baseline}` (the commit before issue 17 changed the hot path), its own stack from its own tree; "
        f"current: this tree. {rounds} alternating rounds.",
        "",
        "| measure | baseline | current | current / baseline |",
        "|---|---:|---:|---:|",
        row(f"cache-hit Embed through Envoy, peak req/s (best of concurrency 64/128/256, {PEAK_CONNECTIONS} conns)",
            lambda res: res["peak"], "req/s", "{:.0f}"),
        row("cache-hit Embed through Envoy, p50 at concurrency 1", r("edge_c1", "p50"), "ms"),
        row("cache-hit Embed through Envoy, p99 at concurrency 1", r("edge_c1", "p99"), "ms"),
        row("Envoy + rate-limit decision added, p50 at concurrency 1",
            lambda res: res["rows"]["edge_c1"]["p50"] - res["rows"]["gateway_c1"]["p50"], "ms"),
        row("streamed cache hit (32 tokens) through Envoy, req/s at concurrency 64", r("stream_edge_c64", "rps"),
            "req/s", "{:.0f}"),
        row("streamed cache hit / unary cache hit, p50 at concurrency 1",
            lambda res: res["rows"]["stream_edge_c1"]["p50"] / res["rows"]["edge_c1"]["p50"], "x"),
        row("mesh over direct Triton, Embed p50 added at concurrency 1", added("embed_c1", "p50"), "ms"),
        row("mesh over direct Triton, Embed p99 added at concurrency 1", added("embed_c1", "p99"), "ms"),
        row("mesh / direct Triton, Embed req/s at concurrency 32",
            lambda res: res["rows"]["mesh_embed_c32"]["rps"] / res["rows"]["triton_embed_c32"]["rps"], "", "{:.2f}"),
        row("mesh over direct Triton, time to first token added (p50)", added("ttft", "p50"), "ms"),
        "",
        "CPU per cache-hit Embed through Envoy at concurrency 64 (ms, every process; lower is better):",
        "",
        "| process | baseline | current |",
        "|---|---:|---:|",
    ]
    for process in sorted(set(before["cpu"]) | set(after["cpu"]), key=lambda p: -before["cpu"].get(p, 0)):
        lines.append(f"| {process} | {before['cpu'].get(process, 0):.3f} | {after['cpu'].get(process, 0):.3f} |")
    lines.append(f"| all | {sum(before['cpu'].values()):.3f} | {sum(after['cpu'].values()):.3f} |")
    lines += ["", "Resident memory after the run (MiB):", "", "| process | baseline | current | ratio |",
              "|---|---:|---:|---:|"]
    for process in sorted(before["rss"]):
        b, a = before["rss"][process], after["rss"].get(process, float("nan"))
        lines.append(f"| {process} | {b:.0f} | {a:.0f} | {a / b:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the request counts")
    parser.add_argument("--current-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="settings for the current stack only (e.g. MESH_GATEWAY_EVENT_LOOP=asyncio for an A/B)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    run_dir = ROOT / "build" / "bench-hot-path"
    tenants = bench_tenants(run_dir / "tenants.yaml")
    assert BENCH_KEY  # the tenants file above admits it with limits far above this machine
    tree = baseline_tree(args.baseline, run_dir / "baseline-tree")
    handles: dict[str, StackHandle] = {}
    try:
        handles["baseline"] = start_stack("baseline", tree, run_dir / "baseline", tenants, {})
        handles["current"] = start_stack("current", ROOT, run_dir / "current", tenants,
                                         dict(item.split("=", 1) for item in args.current_env))

        async def run() -> dict:
            probes = {name: Probe(handle) for name, handle in handles.items()}
            try:
                return await measure(probes, args.rounds, args.scale)
            finally:
                for probe in probes.values():
                    await probe.close()
        results = asyncio.run(run())
    finally:
        for handle in handles.values():
            handle.stop()
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    markdown = render(results, args.baseline, args.rounds)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "hot-path", "Hot path: before and after issue 17, one run")


if __name__ == "__main__":
    main()

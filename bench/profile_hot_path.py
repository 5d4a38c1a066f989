"""Where a cache hit's CPU goes, hop by hop: cache-hit Embed through Envoy (TLS, rate limits, 2 gateways) at
a steady load, every process's CPU time read from /proc before and after, divided by the requests served; and
a py-spy flame graph of each Python process under that load (docs/profiles/*.svg).

    make profile        (or: python -m bench.profile_hot_path --seconds 20 --concurrency 64)

Profile first, then remove cost where it is: this is the map for issue 17.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench.edge import AUTH, EMBED, bench_tenants
from bench.inference_path import ROOT, write_section
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tools.stack import LocalStack, StackPorts

PROFILES = ROOT / "docs" / "profiles"
# The Python processes worth a flame graph (Envoy, Redis and Triton are not Python).
PYTHON_SERVICES = ("gateway", "gateway-1", "cache", "ratelimit")
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is missing: pip install -r requirements/bench.txt (make profile does)")
    return found


async def load(address: str, ca: bytes, concurrency: int, seconds: float) -> int:
    """Cache-hit Embed calls through the edge for `seconds`; the number served."""
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        answer = await mesh.Embed(EMBED, metadata=AUTH, timeout=60)  # fills the embedding cache
        await asyncio.sleep(0.5)
        served = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal served
            while time.monotonic() < deadline:
                answer = await mesh.Embed(EMBED, metadata=AUTH, timeout=30)
                if answer.metadata.cache_status != mesh_pb2.CACHE_STATUS_EXACT_HIT:
                    raise RuntimeError("expected an embedding cache hit")
                served += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        del answer
        return served


def profile(stack: LocalStack, concurrency: int, seconds: float) -> dict:
    asyncio.run(load(stack.edge_address, stack.pki.ca_cert.read_bytes(), 8, 2.0))  # warm: connections, TLS
    pids = {name: process.pid for name, process in stack.processes.items() if process.alive()}
    pids["client (this benchmark)"] = os.getpid()
    PROFILES.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([py_spy(), "record", "--nonblocking", "--rate", "97", "--duration", str(int(seconds)),
                               "--pid", str(pids[name]), "--output", str(PROFILES / f"cache-hit-embed-{name}.svg")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name in PYTHON_SERVICES if name in pids]
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    served = asyncio.run(load(stack.edge_address, stack.pki.ca_cert.read_bytes(), concurrency, seconds))
    elapsed = time.monotonic() - started
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for spy in spies:
        spy.wait(timeout=seconds + 30)
    used = {name: after[name] - before[name] for name in pids}
    return {"served": served, "elapsed": elapsed, "cpu": used, "concurrency": concurrency}


def render(result: dict) -> str:
    served, cpu = result["served"], result["cpu"]
    total = sum(cpu.values())
    lines = [
        "Command: `make profile` (bench/profile_hot_path.py)  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared by everything below. Load: cache-hit Embed "
        f"through Envoy (TLS, a rate-limit call each, least_request over 2 gateways), concurrency "
        f"{result['concurrency']}, {result['elapsed']:.0f} s: {served} requests, {served / result['elapsed']:.0f} "
        "req/s.", "",
        "| process | CPU s | CPU ms per request | share of all CPU |", "|---|---:|---:|---:|"]
    for name, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
        if seconds <= 0:
            continue
        lines.append(f"| {name} | {seconds:.2f} | {seconds / served * 1000:.3f} | {seconds / total * 100:.0f}% |")
    lines += ["", f"All processes: {total / served * 1000:.2f} CPU ms per cache hit. Flame graphs: "
              + ", ".join(f"[{name}](docs/profiles/cache-hit-embed-{name}.svg)" for name in PYTHON_SERVICES) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    py_spy()
    run_dir = ROOT / "build" / "profile-hot-path"
    stack = LocalStack(run_dir, StackPorts.free(1, gateways=2), tenants_file=bench_tenants(run_dir / "tenants.yaml"),
                       with_retrieval=False)
    stack.start()
    try:
        result = profile(stack, args.concurrency, args.seconds)
    finally:
        stack.stop()
    markdown = render(result)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "profile-hot-path", "Hot path profile: where a cache hit's CPU goes")


if __name__ == "__main__":
    main()

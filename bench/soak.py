"""Soak: the whole stack (Envoy with TLS, 2 gateways, router, cache, retrieval, rate limits, Redis, milvus-lite,
Triton) under a steady mixed load at half its measured capacity, for 20 minutes by default.

First the capacity of the mix is measured closed-loop; then requests arrive at half that rate, open-loop (a
request is sent on schedule whether or not earlier ones have answered, as real clients do). Every 10 s: the
requests and errors of the interval, their p50/p99, and the resident memory of every process (with its
children: Triton's python-backend stubs). Memory growth is the mean of the last 2 minutes against the mean of
minutes 2-4 (after the caches have filled). Writes docs/soak.png and the soak section of BENCHMARKS.md.
Targets (issue 7): error rate 0, memory growth <= 5% per process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.edge import bench_tenants
from bench.inference_path import ROOT, pct, write_section
from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, retrieval_pb2
from tools.stack import LocalStack, StackPorts

AUTH = (("x-api-key", "bench-edge-key"),)
LLM, EMBEDDER = "smollm2-135m-instruct", "all-minilm-l6-v2"
INTERVAL_S = 10.0
TOPICS = ["volcanoes", "sourdough bread", "TCP congestion control", "lighthouses", "glaciers", "bees",
          "the printing press", "tides", "solar panels", "chess openings"]
# Bounded pools of inputs: after warm-up the caches hold a steady working set, so memory should plateau.
SENTENCES = [f"Fact {i} about {TOPICS[i % len(TOPICS)]}: it matters for reason number {i // 10}." for i in range(2000)]
CACHED_PROMPTS = [f"In one sentence, what are {t}? (variant {i})" for t in TOPICS for i in range(5)]
FRESH_PROMPTS = [f"Give one word about {t}, take {i}." for t in TOPICS for i in range(30)]
# The mix: share of requests per kind.
MIX = {"embed": 0.45, "generate_cached": 0.25, "generate_fresh": 0.10, "search": 0.20}


@dataclass
class Interval:
    at_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total_kb / 1024


class Mix:
    def __init__(self, mesh: mesh_pb2_grpc.InferenceMeshStub, seed: int = 7) -> None:
        self._mesh = mesh
        self._random = random.Random(seed)

    async def one(self) -> None:
        kind = self._random.choices(list(MIX), weights=list(MIX.values()))[0]
        pick = self._random.choice
        if kind == "embed":
            await self._mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=[pick(SENTENCES)]), metadata=AUTH,
                                   timeout=30)
        elif kind == "search":
            await self._mesh.Search(retrieval_pb2.SearchRequest(query=pick(SENTENCES), top_k=3), metadata=AUTH,
                                    timeout=30)
        else:
            cached = kind == "generate_cached"
            request = mesh_pb2.GenerateRequest(
                model=LLM, max_tokens=16 if cached else 8, temperature=0.0,
                cache_mode=mesh_pb2.CACHE_MODE_DEFAULT if cached else mesh_pb2.CACHE_MODE_BYPASS,
                messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER,
                                               content=pick(CACHED_PROMPTS if cached else FRESH_PROMPTS))])
            async for _ in self._mesh.Generate(request, metadata=AUTH, timeout=60):
                pass


async def timed(call, interval: Interval) -> None:
    t0 = time.perf_counter()
    try:
        await call()
        interval.latencies_ms.append((time.perf_counter() - t0) * 1000)
    except grpc.aio.AioRpcError as exc:
        interval.errors.append(f"{exc.code().name}: {exc.details()}")


async def capacity(mix: Mix, concurrency: int, seconds: float) -> float:
    """Requests/s of the mix, closed-loop at `concurrency`."""
    done = 0
    deadline = time.monotonic() + seconds
    scratch = Interval(0.0)

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await timed(mix.one, scratch)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - started)


async def soak(stack: LocalStack, minutes: float, capacity_s: float, load_share: float) -> dict:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(stack.edge_address, credentials) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        documents = [retrieval_pb2.Document(id=f"doc/{i}", text=" ".join(s for s in SENTENCES if t in s)[:4000])
                     for i, t in enumerate(TOPICS)]
        await mesh.UpsertDocuments(iter([retrieval_pb2.UpsertDocumentsRequest(documents=documents)]), metadata=AUTH,
                                   timeout=600)
        mix = Mix(mesh)
        await capacity(mix, 8, 20.0)  # warm every path
        measured = await capacity(mix, 16, capacity_s)
        rate = measured * load_share
        print(f"capacity of the mix: {measured:.1f} req/s; soaking at {rate:.1f} req/s for {minutes:g} min",
              flush=True)
        intervals: list[Interval] = []
        pending: set[asyncio.Task] = set()
        started = time.monotonic()
        next_send = started
        current = Interval(0.0)
        next_sample = started + INTERVAL_S
        while time.monotonic() - started < minutes * 60:
            now = time.monotonic()
            if now >= next_sample:
                current.rss_mb = {name: tree_rss_mb(p.pid) for name, p in stack.processes.items()}
                intervals.append(current)
                print(f"{current.at_s / 60:5.1f} min  {len(current.latencies_ms) / INTERVAL_S:5.1f} req/s  "
                      f"p99 {pct(current.latencies_ms, 99):7.1f} ms  errors {len(current.errors)}", flush=True)
                current = Interval(now - started)
                next_sample += INTERVAL_S
            if now >= next_send and len(pending) < 512:
                task = asyncio.create_task(timed(mix.one, current))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_send += random.expovariate(rate)  # Poisson arrivals at the chosen rate
            await asyncio.sleep(max(0.0, min(next_send, next_sample) - time.monotonic()))
        await asyncio.gather(*pending)
    return {"capacity": measured, "rate": rate, "intervals": intervals}


def growth(intervals: list[Interval]) -> dict[str, tuple[float, float, float]]:
    """Per process: (baseline MB, final MB, growth %): minutes 2-4 against the last 2 minutes."""
    base = [i for i in intervals if 120 <= i.at_s < 240] or intervals[: max(1, len(intervals) // 5)]
    last = [i for i in intervals if i.at_s >= intervals[-1].at_s - 120]
    result = {}
    for name in intervals[-1].rss_mb:
        before = sum(i.rss_mb.get(name, 0.0) for i in base) / len(base)
        after = sum(i.rss_mb.get(name, 0.0) for i in last) / len(last)
        result[name] = (before, after, (after / before - 1) * 100 if before else 0.0)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = result["intervals"]
    minutes = [i.at_s / 60 for i in intervals]
    figure, (latency, errors, memory) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    latency.plot(minutes, [pct(i.latencies_ms, 99) for i in intervals], label="p99")
    latency.plot(minutes, [pct(i.latencies_ms, 50) for i in intervals], label="p50")
    latency.set_ylabel("latency, ms")
    latency.set_title(f"Soak at {result['rate']:.1f} req/s (half of the measured {result['capacity']:.1f} req/s)")
    latency.legend()
    errors.plot(minutes, [100 * len(i.errors) / max(1, len(i.errors) + len(i.latencies_ms)) for i in intervals])
    errors.set_ylabel("errors, % of requests")
    for name in intervals[-1].rss_mb:
        memory.plot(minutes, [i.rss_mb.get(name, 0.0) for i in intervals], label=name)
    memory.set_ylabel("resident memory, MB")
    memory.set_yscale("log")
    memory.set_xlabel("minutes")
    memory.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def render(result: dict, minutes: float) -> str:
    intervals = result["intervals"]
    latencies = [v for i in intervals for v in i.latencies_ms]
    errors = [e for i in intervals for e in i.errors]
    requests = len(latencies) + len(errors)
    lines = [
        "Command: `make soak` (bench/soak.py)  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared by the load generator and every process.",
        "",
        f"Mix through Envoy (TLS, rate limits, 2 gateways): {', '.join(f'{k} {v:.0%}' for k, v in MIX.items())} "
        "(inputs drawn from bounded pools; fresh generations bypass the cache).",
        f"Measured capacity of the mix (closed loop, 16 callers): {result['capacity']:.1f} req/s. Soak: "
        f"{result['rate']:.1f} req/s, Poisson arrivals, {minutes:g} minutes.",
        "",
        f"Requests: {requests}; errors: {len(errors)} ({100 * len(errors) / max(1, requests):.3f}%, target 0)"
        f"{'; first: ' + errors[0] if errors else ''}.  ",
        f"Latency over the whole soak: p50 {pct(latencies, 50):.1f} ms, p99 {pct(latencies, 99):.1f} ms; worst "
        f"10-second p99 {max(pct(i.latencies_ms, 99) for i in intervals if i.latencies_ms):.1f} ms.",
        "",
        "| process | memory, minutes 2-4 (MB) | memory, last 2 minutes (MB) | growth | target <= 5% |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (before, after, percent) in growth(intervals).items():
        verdict = "met" if percent <= 5 else "missed"
        lines.append(f"| {name} | {before:.1f} | {after:.1f} | {percent:+.1f}% | {verdict} |")
    lines += ["", "![soak](docs/soak.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--capacity-seconds", type=float, default=60.0)
    parser.add_argument("--load-share", type=float, default=0.5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    run_dir = ROOT / "build" / "soak"
    stack = LocalStack(run_dir, StackPorts.free(1, gateways=2), tenants_file=bench_tenants(run_dir / "tenants.yaml"))
    stack.start()
    try:
        result = asyncio.run(soak(stack, args.minutes, args.capacity_seconds, args.load_share))
    finally:
        stack.stop()
    markdown = render(result, args.minutes)
    print(markdown)
    if not args.no_write:
        plot(result, ROOT / "docs" / "soak.png")
        write_section(markdown, "soak", "Soak: 20 minutes at half capacity")


if __name__ == "__main__":
    main()

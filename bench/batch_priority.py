"""Batch work in the idle capacity: an interactive tenant's time to first token alone, and again while a batch of
500 or more chat lines runs (OpenAI's Batch API on the mesh, services/gateway/batches), in one run on one stack; Triton
called directly for the same generation is the row they are read against. Target: the interactive TTFT p99
beside the batch within 1.5x of alone. Also the batch's throughput. Prints a table and rewrites its section of
BENCHMARKS.md.

Two interactive loads: paced (a request at fixed intervals whether or not the last one ended, people at chat
windows: the interval is the mean request time alone over --utilization, so capacity is idle between them, the
capacity a batch is for) and back to back (one caller sending the
next request as soon as the last ends: the engine is never idle, so no capacity is left for the batch and every
line it runs is taken from the interactive caller).

    python -m bench.batch_priority [--lines 500] [--interactive 60] [--utilization 0.4] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time

import grpc
import httpx
import openai
from tritonclient.grpc import service_pb2_grpc

from bench.edge import BENCH_KEY, bench_tenants
from bench.inference_path import ROOT, Sample, direct_generate, mesh_generate, pct, run_load, write_section
from inference_mesh.v1 import mesh_pb2_grpc
from tools.metrics import metric_sum
from tools.stack import LocalStack, StackPorts

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 8
AUTH = (("x-api-key", BENCH_KEY),)


def _batch_file(model: str, lines: int) -> bytes:
    return "\n".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0.7,
                 "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}]}})
        for i in range(lines)).encode()


async def _ttft(call, requests: int) -> list[float]:
    """Back to back, one at a time."""
    return _ms((await run_load(call, 1, requests))[0])


async def _paced_ttft(call, requests: int, gap_s: float) -> list[float]:
    """One request every gap_s, each started on time whatever the others are doing (an open loop)."""
    started = time.perf_counter()
    tasks = []
    for i in range(requests):
        await asyncio.sleep(max(0.0, started + i * gap_s - time.perf_counter()))
        tasks.append(asyncio.create_task(call()))
    return _ms(await asyncio.gather(*tasks))


def _ms(samples) -> list[float]:
    return [s.ttft_s * 1000 for s in samples if isinstance(s, Sample) and s.ttft_s is not None]


async def _polled(client: openai.OpenAI, batch_id: str, done):
    """The batch once `done` holds of it (polled as a client would)."""
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        await asyncio.sleep(0.25)


async def measure(stack: LocalStack, model: str, lines: int, interactive: int, utilization: float,
                  direct_model: str | None) -> dict:
    channel = grpc.aio.insecure_channel(stack.gateway_address)
    triton_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}")
    mesh = mesh_generate(mesh_pb2_grpc.InferenceMeshStub(channel), model=model, max_tokens=MAX_TOKENS, auth=AUTH)
    triton = direct_generate(service_pb2_grpc.GRPCInferenceServiceStub(triton_channel), max_tokens=MAX_TOKENS,
                             triton_model=direct_model) if direct_model else None
    client = openai.OpenAI(api_key=BENCH_KEY, base_url=f"http://127.0.0.1:{stack.ports.gateway_http[0]}/v1",
                           max_retries=0, http_client=httpx.Client(timeout=60))
    try:
        await _ttft(mesh, 5)  # warm
        # The client's own collector pausing would be read as the mesh's latency (the services freeze theirs:
        # services/common/gc_pauses.py).
        gc.collect()
        gc.freeze()
        direct = await _ttft(triton, interactive) if triton is not None else None
        samples, elapsed = await run_load(mesh, 1, interactive)
        alone, gap_s = _ms(samples), elapsed / interactive / utilization
        alone_paced = await _paced_ttft(mesh, interactive, gap_s)
        uploaded = client.files.create(file=("batch.jsonl", _batch_file(model, lines)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        await _polled(client, batch.id, lambda b: b.request_counts.completed >= 8)
        beside = {}
        for load, run in (("paced", lambda: _paced_ttft(mesh, interactive, gap_s)),
                          ("back to back", lambda: _ttft(mesh, interactive))):
            preempted, before = _preemptions(stack), client.batches.retrieve(batch.id).request_counts.completed
            samples = await run()
            after = client.batches.retrieve(batch.id)
            beside[load] = {"ttft": samples, "preempted": _preemptions(stack) - preempted,
                            "lines": after.request_counts.completed - before, "running": after.status == "in_progress"}
        done = await _polled(client, batch.id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
    finally:
        client.close()
        await channel.close()
        await triton_channel.close()
    seconds = done.completed_at - done.in_progress_at if done.completed_at and done.in_progress_at else 0
    return {"direct": direct, "alone": alone, "alone_paced": alone_paced, "beside": beside, "lines": lines,
            "status": done.status, "completed": done.request_counts.completed, "failed": done.request_counts.failed,
            "batch_s": seconds, "interactive": interactive, "gap_s": gap_s,
            "utilization": utilization}


def _preemptions(stack: LocalStack) -> int:
    """Batch attempts the router stopped for interactive requests (services/router/preemption.py), so far."""
    return int(metric_sum(stack.ports.router_metrics, "mesh_router_preemptions_total"))


def render(results: list[tuple[str, dict]]) -> str:
    first = results[0][1]
    lines = [f"{time.strftime('%Y-%m-%d')}, 2 shared cores, one Triton, one gateway (no edge): an interactive caller "
             f"streaming {MAX_TOKENS}-token chat answers, {first['interactive']} requests per row, paced (an open "
             f"loop, a request every mean request time alone / {first['utilization']:g}: capacity is idle between "
             "them) or back to back (the engine is "
             f"never idle: no capacity is left for a batch); the batch's lines are {MAX_TOKENS}-token chat "
             "completions run by the gateway's batch runner at batch priority, as many at a time as each table "
             "says (`MESH_GATEWAY_BATCH__CONCURRENCY`, default 4). The ratio is p99 over the same load alone.", ""]
    for engine, result in results:
        rows = ([("Triton directly, back to back", result["direct"], None)] if result["direct"] else []) + [
            ("mesh alone, paced", result["alone_paced"], None),
            (f"mesh beside a {result['lines']}-line batch, paced", result["beside"]["paced"]["ttft"],
             result["alone_paced"]),
            ("mesh alone, back to back", result["alone"], None),
            (f"mesh beside a {result['lines']}-line batch, back to back", result["beside"]["back to back"]["ttft"],
             result["alone"])]
        lines += [f"**{engine}** (paced: a request every {result['gap_s']:.2f} s)", "",
                  "| interactive TTFT | p50 (ms) | p90 (ms) | p99 (ms) | p99 / alone |",
                  "|---|---|---|---|---|"]
        for label, values, alone in rows:
            ratio = f"{pct(values, 99) / pct(alone, 99):.2f}" if alone else ""
            lines.append(f"| {label} | {pct(values, 50):.1f} | {pct(values, 90):.1f} | {pct(values, 99):.1f} | "
                         f"{ratio} |")
        rate = result["completed"] / result["batch_s"] if result["batch_s"] else 0.0
        during = "; ".join(f"{load}: {row['lines']} lines, {row['preempted']} preemptions"
                           f"{'' if row['running'] else ', THE BATCH HAD ENDED BY THE ROW END'}"
                           for load, row in result["beside"].items())
        lines += ["", f"The batch: {result['status']}, {result['completed']} lines completed and {result['failed']} "
                  f"failed in {result['batch_s']:.1f} s ({rate:.2f} lines/s). During each row beside it: {during}.",
                  ""]
    return "\n".join(lines)


def _cpu_stack(root) -> tuple[LocalStack, str, str | None]:
    stack = LocalStack(root / "run", StackPorts.free(1, gateways=1), tenants_file=bench_tenants(root / "tenants.yaml"),
                       with_edge=False, with_retrieval=False, with_cache=False)
    return stack, MODEL, "smollm2"


def _standin_stack(root) -> tuple[LocalStack, str, str | None]:
    """The TensorRT-LLM stand-in streaming at a GPU's pace (40 tokens/s a request, every request at once, as
    in-flight batching runs them): what the mesh's own scheduling does to TTFT where the engine batches."""
    from bench.token_relay import MODEL as STANDIN_MODEL
    from bench.token_relay import relay_stack

    stack = relay_stack(root)
    stack.with_edge = False
    stack.service_env["triton"] = {"MESH_STANDIN_FAST_TOKENS_PER_S": "40"}
    return stack, STANDIN_MODEL, None


def _standin_two_lines(root) -> tuple[LocalStack, str, str | None]:
    """As above with 2 lines at a time (MESH_GATEWAY_BATCH__CONCURRENCY): batch throughput against interference."""
    stack, model, direct = _standin_stack(root)
    stack.service_env["gateway"]["MESH_GATEWAY_BATCH__CONCURRENCY"] = "2"
    return stack, model, direct


# (label, stack, lines): enough lines that the batch still runs when both rows beside it end (the stand-in at 4
# lines at a time ran 500 lines in 29 s, before its second row began).
ENGINES = {"cpu": ("SmolLM2-135M on CPU (llama.cpp: one request at a time), 4 lines at a time", _cpu_stack, 500),
           "standin": ("TensorRT-LLM stand-in at 40 tokens/s a request, batched in flight, 4 lines at a time",
                       _standin_stack, 1500),
           "standin-2": ("TensorRT-LLM stand-in as above, 2 lines at a time", _standin_two_lines, 750)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, help="the batch's lines (default: each engine's own, 500 or more)")
    parser.add_argument("--interactive", type=int, default=60)
    parser.add_argument("--utilization", type=float, default=0.4,
                        help="the paced load's share of one back-to-back caller's requests per second")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = []
    for name in args.engines.split(","):
        label, make, lines = ENGINES[name]
        stack, model, direct_model = make(ROOT / "build" / f"bench-batch-{name}")
        stack.start()
        try:
            measured = measure(stack, model, args.lines or lines, args.interactive, args.utilization, direct_model)
            results.append((label, asyncio.run(measured)))
        finally:
            stack.stop()
    markdown = render(results)
    print(markdown)
    if not args.no_write:
        write_section(markdown, "batch-priority", "Batch inference: interactive TTFT beside a batch")


if __name__ == "__main__":
    main()

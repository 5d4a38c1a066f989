"""A GPU pool against the CPU pool, through the mesh and on Triton directly, in one run on a GPU machine.

The cpu pool is a real tritonserver (nvidia-pytriton's binary, python backend) serving the SmolLM2 GGUF with
llama.cpp on CPU cores. The gpu pool (`--gpu-pool`) is one of:
- `llama-cuda` (default): a second such tritonserver with every layer on the GPU; needs a Triton environment
  (MESH_TRITON_VENV) whose llama-cpp-python is a CUDA build (`CMAKE_ARGS="-DGGML_CUDA=on" pip install
  llama-cpp-python==0.3.16`). With a CPU build it runs on the CPU too, which checks the harness without a GPU.
- `triton`: an already running Triton at `--gpu-triton HOST:GRPC_PORT` (with `--gpu-metrics HOST:PORT`) serving
  `--gpu-model`, e.g. compose's triton-a100 with the TensorRT-LLM BLS model `smollm2-trtllm`.
- `trtllm-standin`: the TensorRT-LLM repository with the CPU stand-in (tools/fill_trtllm.py --standin), which
  checks the TensorRT-LLM harness without a GPU (its numbers then say nothing about a GPU).
Router and gateway route public models `smollm2-135m-instruct` (gpu pool) and `smollm2-135m-instruct-cpu`.
Measures time to first token and tokens/s at concurrency 1 and 4, through the mesh and directly, and prints a
table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import grpc
import yaml
from tritonclient.grpc import service_pb2_grpc

from bench.inference_path import ROOT, direct_generate, mesh_generate, pct, run_load
from inference_mesh.v1 import mesh_pb2_grpc
from tools.fill_trtllm import STANDIN, TrtllmPools
from tools.fill_trtllm import write as write_trtllm
from tools.processes import free_port, wait_grpc_serving
from tools.stack import start_service
from tools.triton import TritonInstall, TritonPorts, wait_triton_ready

MODELS = {"gpu": "smollm2-135m-instruct", "cpu": "smollm2-135m-instruct-cpu"}


def gpu_model() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no GPU (nvidia-smi not found): both pools ran on the CPU"
    answer = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                            text=True)
    return answer.stdout.strip() or "no GPU found"


def registry(endpoints: dict[str, tuple[str, str]], triton_models: dict[str, str]) -> dict:
    """endpoints: pool -> (gRPC host:port, metrics host:port)."""
    def model(pool: str) -> dict:
        return {"kind": "generate", "triton_model": triton_models[pool], "version": "1", "pools": [pool],
                "max_output_tokens": 512, "context_tokens": 2048}
    return {"pools": {pool: {"gpu_class": pool, "replicas": [{"name": f"triton-{pool}-0", "grpc": grpc_address,
                                                             "metrics": metrics}]}
                      for pool, (grpc_address, metrics) in endpoints.items()},
            "models": {MODELS[pool]: model(pool) for pool in endpoints}}


def summary(samples: list, elapsed_s: float) -> dict:
    tokens = sum(round((s.latency_s - s.ttft_s) / s.tpot_s) + 1 if s.tpot_s else 1 for s in samples)
    return {"ttft_p50_ms": pct([s.ttft_s * 1000 for s in samples], 50),
            "ttft_p95_ms": pct([s.ttft_s * 1000 for s in samples], 95),
            "stream_tok_s": pct([1 / s.tpot_s for s in samples if s.tpot_s], 50),
            "total_tok_s": tokens / elapsed_s, "requests": len(samples)}


async def measure(endpoints: dict[str, tuple[str, str]], triton_models: dict[str, str], gateway: str,
                  concurrencies: list[int], requests: int, max_tokens: int) -> list[dict]:
    rows = []
    async with grpc.aio.insecure_channel(gateway) as mesh_channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(mesh_channel)
        for pool, (grpc_address, _) in endpoints.items():
            async with grpc.aio.insecure_channel(grpc_address) as triton_channel:
                triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
                paths = {"direct": direct_generate(triton, max_tokens, triton_models[pool]),
                         "mesh": mesh_generate(mesh, model=MODELS[pool], max_tokens=max_tokens)}
                for call in paths.values():
                    await run_load(call, 1, 3)  # warm: CUDA kernels, KV buffers, connections
                for concurrency in concurrencies:
                    for path, call in paths.items():
                        samples, elapsed = await run_load(call, concurrency, requests * concurrency)
                        rows.append({"pool": pool, "path": path, "concurrency": concurrency,
                                     **summary(samples, elapsed)})
    return rows


def render(rows: list[dict], gpu_name: str, max_tokens: int, gpu_pool: str) -> str:
    lines = [f"Machine: {gpu_name}, {os.cpu_count()} CPU cores, {platform.machine()}; SmolLM2-135M-Instruct, "
             f"greedy, {max_tokens} tokens per request. gpu pool: {gpu_pool}; cpu pool: llama.cpp (Q4_1 GGUF).",
             "",
             "| pool | path | concurrency | TTFT p50 ms | TTFT p95 ms | tokens/s per stream | tokens/s total |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pool']} | {r['path']} | {r['concurrency']} | {r['ttft_p50_ms']:.1f} | "
                     f"{r['ttft_p95_ms']:.1f} | {r['stream_tok_s']:.0f} | {r['total_tok_s']:.0f} |")
    by = {(r["pool"], r["path"], r["concurrency"]): r for r in rows}
    lines.append("")
    for c in sorted({r["concurrency"] for r in rows}):
        gpu, cpu = by[("gpu", "mesh", c)], by[("cpu", "mesh", c)]
        direct = by[("gpu", "direct", c)]
        lines.append(f"Concurrency {c}, through the mesh: the gpu pool gives "
                     f"{gpu['total_tok_s'] / cpu['total_tok_s']:.1f}x the cpu pool's tokens/s and "
                     f"{cpu['ttft_p50_ms'] / gpu['ttft_p50_ms']:.1f}x faster first tokens; the mesh keeps "
                     f"{gpu['total_tok_s'] / direct['total_tok_s']:.0%} of direct Triton's gpu tokens/s.  ")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=8, help="per caller")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cpu-threads", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--gpu-pool", choices=["llama-cuda", "triton", "trtllm-standin"], default="llama-cuda")
    parser.add_argument("--gpu-triton", help="HOST:GRPC_PORT of a running Triton (--gpu-pool triton)")
    parser.add_argument("--gpu-metrics", default="", help="HOST:PORT of its metrics (--gpu-pool triton)")
    parser.add_argument("--gpu-model", default="smollm2-trtllm", help="its Triton model (--gpu-pool triton)")
    args = parser.parse_args()
    run = ROOT / "build" / "gpu-pool"
    run.mkdir(parents=True, exist_ok=True)
    install = TritonInstall()
    ports = {"cpu": TritonPorts.free()}
    processes = {"cpu": install.start("triton-cpu", ports["cpu"], run / "triton-cpu.log", models=["smollm2"],
                                      cpu_threads=args.cpu_threads)}
    triton_models = {"cpu": "smollm2", "gpu": "smollm2"}
    if args.gpu_pool == "triton":
        if not args.gpu_triton:
            parser.error("--gpu-pool triton needs --gpu-triton HOST:GRPC_PORT")
        endpoints = {"gpu": (args.gpu_triton, args.gpu_metrics)}
        triton_models["gpu"] = args.gpu_model
    else:
        ports["gpu"] = TritonPorts.free()
        if args.gpu_pool == "trtllm-standin":
            write_trtllm(run / "trtllm", standin=True)
            triton_models["gpu"] = TrtllmPools.load().model.triton_name
            processes["gpu"] = install.start("triton-gpu", ports["gpu"], run / "triton-gpu.log",
                                             models=[triton_models["gpu"]], repository=run / "trtllm" / STANDIN,
                                             cpu_threads=4)
        else:
            processes["gpu"] = install.start("triton-gpu", ports["gpu"], run / "triton-gpu.log", models=["smollm2"],
                                             cpu_threads=4, gpu_layers=-1)
        endpoints = {"gpu": (f"127.0.0.1:{ports['gpu'].grpc}", f"127.0.0.1:{ports['gpu'].metrics}")}
    endpoints["cpu"] = (f"127.0.0.1:{ports['cpu'].grpc}", f"127.0.0.1:{ports['cpu'].metrics}")
    try:
        for pool, process in processes.items():
            wait_triton_ready(process, ports[pool], 300)
        (run / "registry.yaml").write_text(yaml.safe_dump(registry(endpoints, triton_models)))
        router_port, gateway_port = free_port(), free_port()
        processes["router"] = start_service("services.router", "router", {
            "MESH_ROUTER_PORT": str(router_port), "MESH_ROUTER_REGISTRY_FILE": str(run / "registry.yaml"),
            "MESH_ROUTER_METRICS_PORT": str(free_port())}, run / "router.log")
        wait_grpc_serving(f"127.0.0.1:{router_port}", processes["router"], 60)
        processes["gateway"] = start_service("services.gateway", "gateway", {
            "MESH_GATEWAY_PORT": str(gateway_port), "MESH_GATEWAY_METRICS_PORT": str(free_port()),
            "MESH_GATEWAY_ROUTER_ADDRESS": f"127.0.0.1:{router_port}"}, run / "gateway.log")
        wait_grpc_serving(f"127.0.0.1:{gateway_port}", processes["gateway"], 60)
        rows = asyncio.run(measure(endpoints, triton_models, f"127.0.0.1:{gateway_port}", args.concurrency,
                                   args.requests, args.max_tokens))
    finally:
        for process in reversed(list(processes.values())):
            process.stop()
    gpu_name = gpu_model()
    print(render(rows, gpu_name, args.max_tokens, args.gpu_pool))
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu_name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

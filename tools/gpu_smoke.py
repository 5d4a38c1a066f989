"""`make gpu-smoke POOL=a100|t4`: on a host with an NVIDIA GPU, build that pool's TensorRT-LLM engine, start the
compose stack with the pool's profile, and run a pass/fail checklist through the edge (TLS, API key) against the
pool's model, then its speed against the CPU pool through the same mesh (time to first token, ms per token).

Needs: the NVIDIA driver (>= 560 for the 24.10 images' CUDA 12.6, or a data-center driver with forward
compatibility), the NVIDIA container toolkit, Docker with compose v2, the Hugging Face checkpoint under
MESH_HF_MODELS, and `python -m tools.compose_secrets` run once. Each missing part stops it with what to do.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
MODEL = "smollm2-135m-instruct-trt"  # config/registry.compose.yaml
CPU_MODEL = "smollm2-135m-instruct"


def preflight(pool: str) -> None:
    problems = []
    if shutil.which("nvidia-smi") is None:
        problems.append("nvidia-smi not found: install the NVIDIA driver (>= 560 for CUDA 12.6)")
    if shutil.which("docker") is None:
        problems.append("docker not found: install Docker and the NVIDIA container toolkit")
    elif subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        problems.append("`docker compose` (v2) is not available")
    if not (COMPOSE / ".env").is_file():
        problems.append("compose/.env is missing: run `python -m tools.compose_secrets`")
    if problems:
        sys.exit("gpu-smoke cannot start:\n  " + "\n  ".join(problems))
    print(subprocess.run(["nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version", "--format=csv"],
                         capture_output=True, text=True).stdout)


def compose_api_key() -> str:
    """The key tools/compose_secrets.py made for compose's first tenant (compose never serves the dev key)."""
    for line in (COMPOSE / ".env").read_text().splitlines():
        if line.startswith("MESH_API_KEY="):
            return line.split("=", 1)[1]
    sys.exit("compose/.env has no MESH_API_KEY: run `python -m tools.compose_secrets` (it adds what is missing)")


def compose(*args: str) -> None:
    subprocess.run(["docker", "compose", "-f", str(COMPOSE / "docker-compose.yml"), *args], check=True)


def wait_ready(stub: mesh_pb2_grpc.InferenceMeshStub, metadata, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            models = stub.ListModels(mesh_pb2.ListModelsRequest(), metadata=metadata, timeout=10).models
            if any(m.name == MODEL and m.ready for m in models):
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{MODEL} not ready within {timeout_s:.0f} s: docker compose logs engine-builder-* triton-*")
        time.sleep(5)


def checklist(stub: mesh_pb2_grpc.InferenceMeshStub, metadata) -> list[tuple[str, bool, str]]:
    def chat(content: str, **kwargs) -> mesh_pb2.GenerateRequest:
        return mesh_pb2.GenerateRequest(model=MODEL, messages=[mesh_pb2.ChatMessage(
            role=mesh_pb2.ROLE_USER, content=content)], **kwargs)

    def run(request) -> tuple[str, mesh_pb2.GenerateChunk]:
        chunks = list(stub.Generate(request, metadata=metadata, timeout=120))
        return "".join(c.text for c in chunks), chunks[-1]

    checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = []

    def check(name: str):
        def register(function):
            checks.append((name, function))
            return function
        return register

    @check("served by the GPU pool")
    def _pool():
        _, last = run(chat("Say hello.", max_tokens=8, temperature=0.0))
        return last.metadata.pool != "cpu" and not last.metadata.fallback, f"pool {last.metadata.pool}"

    @check("length: completion_tokens = max_tokens, finish LENGTH")
    def _length():
        _, last = run(chat("Count to one hundred.", max_tokens=16, temperature=0.0))
        return (last.usage.completion_tokens == 16 and last.finish_reason == mesh_pb2.FINISH_REASON_LENGTH,
                f"{last.usage.completion_tokens} tokens, {mesh_pb2.FinishReason.Name(last.finish_reason)}")

    @check("an answer that ends: finish STOP, tokens counted")
    def _stop():
        _, last = run(chat("Say hi.", max_tokens=400, temperature=0.0))
        return (last.finish_reason == mesh_pb2.FINISH_REASON_STOP and 0 < last.usage.completion_tokens < 400,
                f"{last.usage.completion_tokens} tokens")

    @check("greedy is repeatable")
    def _greedy():
        first, _ = run(chat("Name three colors.", max_tokens=24, temperature=0.0))
        return first == run(chat("Name three colors.", max_tokens=24, temperature=0.0))[0], first[:40]

    @check("stop string cuts the text")
    def _stop_string():
        full, _ = run(chat("Count from one to twenty in words.", max_tokens=60, temperature=0.0))
        words = full.split()
        if len(words) < 6:
            return False, full
        cut, last = run(chat("Count from one to twenty in words.", max_tokens=60, temperature=0.0, stop=[words[4]]))
        return cut == full[:full.index(words[4])] and last.finish_reason == mesh_pb2.FINISH_REASON_STOP, cut

    @check("multi-byte text has no U+FFFD")
    def _unicode():
        text, _ = run(chat("Write these exactly: 日本語, 🙂, café.", max_tokens=48, temperature=0.0))
        return "\ufffd" not in text, text[:40]

    @check("a prompt over max_input_len is INVALID_ARGUMENT")
    def _too_long():
        try:
            run(chat(" ".join(["lighthouse"] * 6000), max_tokens=4))
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()[:80]
        return False, "accepted"

    results = []
    for name, function in checks:
        try:
            ok, detail = function()
        except Exception as exc:  # a failed check is reported, the others still run
            ok, detail = False, repr(exc)[:120]
        results.append((name, ok, detail))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool", choices=["a100", "t4"], required=True)
    parser.add_argument("--edge", default="localhost:8443")
    parser.add_argument("--ca", type=Path, default=ROOT / "run" / "pki" / "ca.pem")
    parser.add_argument("--api-key", default="", help="default: MESH_API_KEY of compose/.env (compose's tenant)")
    parser.add_argument("--no-up", action="store_true", help="the stack is already running")
    args = parser.parse_args()
    preflight(args.pool)
    if not args.no_up:
        compose("--profile", args.pool, "up", "-d")
    credentials = grpc.ssl_channel_credentials(args.ca.read_bytes())
    metadata = (("x-api-key", args.api_key or compose_api_key()),)
    with grpc.secure_channel(args.edge, credentials) as channel:
        stub = mesh_pb2_grpc.InferenceMeshStub(channel)
        wait_ready(stub, metadata, timeout_s=1800)  # the first start builds the engine
        results = checklist(stub, metadata)
    width = max(len(name) for name, _, _ in results)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    if not all(ok for _, ok, _ in results):
        sys.exit(1)
    with grpc.secure_channel(args.edge, credentials) as channel:
        speeds = {model: speed(mesh_pb2_grpc.InferenceMeshStub(channel), metadata, model)
                  for model in (MODEL, CPU_MODEL)}
    print("\n| model | TTFT p50 ms | ms per token |\n|---|---:|---:|")
    for model, (ttft, per_token) in speeds.items():
        print(f"| {model} | {ttft:.1f} | {per_token:.2f} |")
    print(f"TensorRT-LLM / CPU: TTFT {speeds[MODEL][0] / speeds[CPU_MODEL][0]:.2f}x, "
          f"per token {speeds[MODEL][1] / speeds[CPU_MODEL][1]:.2f}x")


def speed(stub: mesh_pb2_grpc.InferenceMeshStub, metadata, model: str, runs: int = 8) -> tuple[float, float]:
    """Median time to first token and ms per later token of greedy 64-token answers (cache bypassed)."""
    firsts, per_token = [], []
    for i in range(runs):
        request = mesh_pb2.GenerateRequest(model=model, max_tokens=64, temperature=0.0,
                                           cache_mode=mesh_pb2.CACHE_MODE_BYPASS, messages=[mesh_pb2.ChatMessage(
                                               role=mesh_pb2.ROLE_USER, content=f"Story {i}: a lighthouse.")])
        started = time.perf_counter()
        first = None
        last = None
        for chunk in stub.Generate(request, metadata=metadata, timeout=120):
            first = first or time.perf_counter()
            last = chunk
        ended = time.perf_counter()
        firsts.append((first - started) * 1000)
        per_token.append((ended - first) * 1000 / max(1, last.usage.completion_tokens - 1))
    return statistics.median(firsts), statistics.median(per_token)


if __name__ == "__main__":
    main()

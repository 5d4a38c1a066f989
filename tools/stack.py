"""The local stack: Triton replica(s), router and gateway on loopback.

`python -m tools.stack up` is what `make up` runs; the tests and benchmarks build the same stack on free ports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tools.backends import MILVUS_SERVER_PORTS, start_milvus_lite, start_milvus_server, start_redis
from tools.processes import ManagedProcess, free_port, wait_grpc_serving
from tools.triton import MODEL_REPOSITORY, ROOT, TritonInstall, TritonPorts, wait_triton_ready

SERVICE_ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", "PYTHONUNBUFFERED": "1"}


@dataclass
class StackPorts:
    gateway: int
    router: int
    tritons: list[TritonPorts]
    cache: int = 0
    redis: int = 0
    milvus: int = 0
    gateway_metrics: int = 0
    cache_metrics: int = 0
    retrieval: int = 0

    @classmethod
    def free(cls, replicas: int = 1) -> StackPorts:
        return cls(free_port(), free_port(), [TritonPorts.free() for _ in range(replicas)], free_port(),
                   free_port(), free_port(), free_port(), free_port(), free_port())


def render_registry(base: Path, tritons: list[TritonPorts]) -> dict:
    """The registry with the cpu pool's replicas replaced by the Triton processes we started."""
    registry = yaml.safe_load(base.read_text())
    registry["pools"]["cpu"]["replicas"] = [
        {"name": f"triton-cpu-{i}", "grpc": f"127.0.0.1:{p.grpc}", "metrics": f"127.0.0.1:{p.metrics}"}
        for i, p in enumerate(tritons)
    ]
    return registry


def start_service(module: str, name: str, env: dict[str, str], log_path: Path) -> ManagedProcess:
    return ManagedProcess(name, [sys.executable, "-m", module], log_path,
                          env={**os.environ, **SERVICE_ENV, **env}, cwd=ROOT)


@dataclass
class LocalStack:
    run_dir: Path
    ports: StackPorts
    tenants_file: Path = ROOT / "config" / "tenants.yaml"
    registry_file: Path = ROOT / "config" / "registry.yaml"
    triton_models: list[str] | None = None
    with_cache: bool = True
    with_retrieval: bool = True
    # "lite": milvus-lite (embedded HNSW server); "server": a Milvus standalone (milvus-server).
    milvus_backend: str = "lite"
    _milvus_server_ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.ports.router}"

    @property
    def cache_address(self) -> str:
        return f"127.0.0.1:{self.ports.cache}"

    @property
    def retrieval_address(self) -> str:
        return f"127.0.0.1:{self.ports.retrieval}"

    def start_redis(self) -> None:
        self.processes["redis"] = start_redis(self.ports.redis, self.run_dir / "redis.log")

    def start_milvus(self) -> None:
        if self.milvus_backend == "server":
            if not self._milvus_server_ports:
                self._milvus_server_ports = {name: free_port() for name in MILVUS_SERVER_PORTS}
                self._milvus_server_ports["proxy-port"] = self.ports.milvus
            self.processes["milvus"] = start_milvus_server(self._milvus_server_ports, self.run_dir / "milvus-server",
                                                           self.run_dir / "milvus.log")
        else:
            self.processes["milvus"] = start_milvus_lite(self.ports.milvus, self.run_dir / "milvus",
                                                         self.run_dir / "milvus.log")

    def start(self) -> LocalStack:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            install = TritonInstall()
            for i, ports in enumerate(self.ports.tritons):
                self.processes[f"triton-{i}"] = install.start(
                    f"triton-{i}", ports, self.run_dir / f"triton-{i}.log", models=self.triton_models)
            for i, ports in enumerate(self.ports.tritons):
                wait_triton_ready(self.processes[f"triton-{i}"], ports)
            registry = self.run_dir / "registry.yaml"
            registry.write_text(yaml.safe_dump(render_registry(self.registry_file, self.ports.tritons)))
            self.processes["router"] = start_service("services.router", "router", {
                "MESH_ROUTER_PORT": str(self.ports.router),
                "MESH_ROUTER_REGISTRY_FILE": str(registry),
            }, self.run_dir / "router.log")
            wait_grpc_serving(self.router_address, self.processes["router"], 30)
            if self.with_cache or self.with_retrieval:
                self.start_milvus()
            if self.with_retrieval:
                self.processes["retrieval"] = start_service("services.retrieval", "retrieval", {
                    "MESH_RETRIEVAL_PORT": str(self.ports.retrieval),
                    "MESH_RETRIEVAL_MILVUS_URI": f"http://127.0.0.1:{self.ports.milvus}",
                    "MESH_RETRIEVAL_ROUTER_ADDRESS": self.router_address,
                    "MESH_RETRIEVAL_TOKENIZER_FILE": str(MODEL_REPOSITORY / "minilm" / "1" / "tokenizer.json"),
                }, self.run_dir / "retrieval.log")
                wait_grpc_serving(self.retrieval_address, self.processes["retrieval"], 60)
            if self.with_cache:
                self.start_redis()
                self.processes["cache"] = start_service("services.cache", "cache", {
                    "MESH_CACHE_PORT": str(self.ports.cache),
                    "MESH_CACHE_METRICS_PORT": str(self.ports.cache_metrics),
                    "MESH_CACHE_REDIS_URL": f"redis://127.0.0.1:{self.ports.redis}/0",
                    "MESH_CACHE_MILVUS_URI": f"http://127.0.0.1:{self.ports.milvus}",
                    "MESH_CACHE_ROUTER_ADDRESS": self.router_address,
                }, self.run_dir / "cache.log")
                wait_grpc_serving(self.cache_address, self.processes["cache"], 30)
            self.processes["gateway"] = start_service("services.gateway", "gateway", {
                "MESH_GATEWAY_PORT": str(self.ports.gateway),
                "MESH_GATEWAY_METRICS_PORT": str(self.ports.gateway_metrics),
                "MESH_GATEWAY_ROUTER_ADDRESS": self.router_address,
                "MESH_GATEWAY_CACHE_ADDRESS": self.cache_address if self.with_cache else "",
                "MESH_GATEWAY_RETRIEVAL_ADDRESS": self.retrieval_address if self.with_retrieval else "",
                "MESH_GATEWAY_TENANTS_FILE": str(self.tenants_file),
            }, self.run_dir / "gateway.log")
            wait_grpc_serving(self.gateway_address, self.processes["gateway"], 30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Edge first, Triton last, so in-flight work drains in the order it flows.
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        self.processes.clear()


def _up(args: argparse.Namespace) -> None:
    ports = StackPorts(args.gateway_port, args.router_port,
                       [TritonPorts(args.triton_grpc_port, args.triton_grpc_port - 1, args.triton_grpc_port + 1)],
                       cache=50053, redis=6379, milvus=19530, gateway_metrics=9101, cache_metrics=9103,
                       retrieval=50054)
    stack = LocalStack(ROOT / "run", ports)
    print("starting Triton, router, milvus-lite, retrieval, Redis, cache and gateway (logs in run/) ...", flush=True)
    stack.start()
    # The first pid is this process: `make down` signals it, and it stops the others in order.
    (ROOT / "run" / "stack.pids").write_text("\n".join([str(os.getpid())] + [str(p.pid) for p in
                                                                            stack.processes.values()]))
    t = ports.tritons[0]
    print(f"""
inference mesh is up
  gateway (public, InferenceMesh + KServe): {stack.gateway_address}
  router (internal):                       {stack.router_address}
  cache (internal):                        {stack.cache_address}  redis :{ports.redis}  milvus-lite :{ports.milvus}
  retrieval (internal):                    {stack.retrieval_address}
  triton:                                  grpc 127.0.0.1:{t.grpc}  http :{t.http}  metrics :{t.metrics}
  dev API key:                             mesh-dev-key

try it:
  .venv/bin/grpcurl -plaintext -H 'x-api-key: mesh-dev-key' -d '{{"model": "smollm2-135m-instruct", "max_tokens": 32,
    "messages": [{{"role": "ROLE_USER", "content": "Name three colours."}}]}}' \\
    {stack.gateway_address} inference_mesh.v1.InferenceMesh/Generate

Ctrl-C (or `make down`) stops everything.""", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            for process in stack.processes.values():
                process.ensure_alive()
    finally:
        print("\nstopping ...", flush=True)
        stack.stop()
        (ROOT / "run" / "stack.pids").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _down(_: argparse.Namespace) -> None:
    pids_file = ROOT / "run" / "stack.pids"
    if not pids_file.exists():
        print("nothing to stop")
        return
    supervisor, *children = (int(p) for p in pids_file.read_text().split())
    if _alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.2)
    # Only if the supervisor is gone or stuck: stop what is left directly.
    for pid in reversed(children):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    pids_file.unlink(missing_ok=True)
    print("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(required=True)
    up = sub.add_parser("up", help="start the stack in the foreground")
    up.add_argument("--gateway-port", type=int, default=50051)
    up.add_argument("--router-port", type=int, default=50052)
    up.add_argument("--triton-grpc-port", type=int, default=8001)
    up.set_defaults(func=_up)
    down = sub.add_parser("down", help="stop a stack started by `up`")
    down.set_defaults(func=_down)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

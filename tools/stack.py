"""The local stack: Triton replica(s), router and gateway on loopback.

`python -m tools.stack up` is what `make up` runs; the tests and benchmarks build the same stack on free ports.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from services.cache.keys import GATEWAY_READER
from services.common.internal_tls import InternalTls
from services.edge.settings import EdgeSettings
from tools.backends import MILVUS_SERVER_PORTS, start_milvus_lite, start_milvus_server, start_redis
from tools.edge import start_envoy, wait_edge_ready
from tools.pki import Pki, ensure_pki
from tools.processes import ManagedProcess, free_port, wait_grpc_serving
from tools.triton import (
    MODEL_REPOSITORY,
    ROOT,
    TritonInstall,
    TritonPorts,
    registry_models,
    restricted_http_arg,
    wait_triton_ready,
)

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
    # Gateway replicas after the first (Envoy balances over all of them), and their metrics ports.
    extra_gateways: list[int] = field(default_factory=list)
    extra_gateway_metrics: list[int] = field(default_factory=list)
    edge: int = 0
    edge_admin: int = 0
    ratelimit: int = 0
    ratelimit_metrics: int = 0
    router_metrics: int = 0
    retrieval_metrics: int = 0
    edge_metrics: int = 0
    # Redis for rate-limit and budget state (noeviction, persisted), apart from the cache's LRU Redis.
    state_redis: int = 0
    # The OpenAI-compatible HTTP port of each gateway replica, in gateway_ports() order.
    gateway_http: list[int] = field(default_factory=list)

    @classmethod
    def free(cls, replicas: int = 1, gateways: int = 2) -> StackPorts:
        return cls(free_port(), free_port(), [TritonPorts.free() for _ in range(replicas)], free_port(),
                   free_port(), free_port(), free_port(), free_port(), free_port(),
                   [free_port() for _ in range(gateways - 1)], [free_port() for _ in range(gateways - 1)],
                   free_port(), free_port(), free_port(), free_port(), free_port(), free_port(),
                   edge_metrics=free_port(), state_redis=free_port(),
                   gateway_http=[free_port() for _ in range(gateways)])

    def gateway_ports(self) -> list[tuple[int, int]]:
        """(gRPC, metrics) of every gateway replica."""
        return [(self.gateway, self.gateway_metrics), *zip(self.extra_gateways, self.extra_gateway_metrics,
                                                            strict=True)]


def render_registry(base: Path, tritons: list[TritonPorts], semantic_cache: bool = False) -> dict:
    """The registry with the cpu pool's replicas replaced by the Triton processes we started (and, with
    semantic_cache, every generation model opted into semantic hits)."""
    registry = yaml.safe_load(base.read_text())
    if semantic_cache:
        for spec in registry["models"].values():
            if spec["kind"] == "generate":
                spec["semantic_cache"] = True
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
    # The seed of the admin database (tiers, tenants, keys), read when the database is empty.
    tenants_file: Path = ROOT / "config" / "tenants.yaml"
    # The admin database every gateway and the rate-limit service share; "": SQLite in run_dir.
    admin_db_url: str = ""
    registry_file: Path = ROOT / "config" / "registry.yaml"
    # None: the models the registry places on the cpu pool.
    triton_models: list[str] | None = None
    model_repository: Path = MODEL_REPOSITORY
    # Semantic hits for the registry's generation models (off in every shipped registry: opt-in per model).
    semantic_cache: bool = False
    with_cache: bool = True
    with_retrieval: bool = True
    # "lite": milvus-lite (embedded HNSW server); "server": a Milvus standalone (milvus-server).
    milvus_backend: str = "lite"
    # Envoy (TLS, JWT, rate limits) in front of the gateways, with the rate-limit service and token budgets.
    with_edge: bool = True
    # EdgeSettings fields to change, e.g. {"require_client_cert": True}.
    edge_overrides: dict = field(default_factory=dict)
    # Extra environment per service ("router", "gateway", "cache", "retrieval", "ratelimit", and "triton" for
    # every Triton replica and its models), e.g. a setting.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # Tracing: an OTLP collector's gRPC host:port (services, Envoy) and its OTLP/HTTP base URL (Triton exports
    # OTLP over HTTP only). Empty: tracing off.
    otlp_grpc: str = ""
    otlp_http: str = ""
    # mTLS on every internal hop (Envoy → gateways and RLS, gateways → router/cache/retrieval/budgets, cache and
    # retrieval → router, router → Triton), with certificates from the stack's PKI. Off: plaintext on loopback.
    internal_tls: bool = False
    _milvus_server_ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    _edge_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # The gateways' read-only user on the cache's Redis (exact hits read directly).
    _cache_reader_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # The header value Triton's HTTP APIs (all but health) need: nothing in the mesh uses them.
    _triton_http_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # The default users of both Redises (the cache service's, the rate-limit service's).
    _redis_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    @property
    def gateway_addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port, _ in self.ports.gateway_ports()]

    @property
    def gateway_http_addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports.gateway_http]

    @property
    def edge_address(self) -> str:
        return f"127.0.0.1:{self.ports.edge}"

    @property
    def ratelimit_address(self) -> str:
        return f"127.0.0.1:{self.ports.ratelimit}"

    @functools.cached_property
    def pki(self) -> Pki:
        return ensure_pki(self.run_dir / "pki")

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.ports.router}"

    @property
    def cache_address(self) -> str:
        return f"127.0.0.1:{self.ports.cache}"

    @property
    def cache_reader_url(self) -> str:
        """The cache's Redis as the gateways see it: the read-only user."""
        return f"redis://{GATEWAY_READER}:{self._cache_reader_password}@127.0.0.1:{self.ports.redis}/0"

    @property
    def cache_redis_url(self) -> str:
        return f"redis://:{self._redis_password}@127.0.0.1:{self.ports.redis}/0"

    @property
    def state_redis_url(self) -> str:
        return f"redis://:{self._redis_password}@127.0.0.1:{self.ports.state_redis}/0"

    @property
    def retrieval_address(self) -> str:
        return f"127.0.0.1:{self.ports.retrieval}"

    def start_redis(self) -> None:
        self.processes["redis"] = start_redis(self.ports.redis, self.run_dir / "redis.log",
                                              reader_password=self._cache_reader_password,
                                              password=self._redis_password)

    def start_state_redis(self) -> None:
        self.processes["redis-state"] = start_redis(self.ports.state_redis, self.run_dir / "redis-state.log",
                                                    role="state", name="redis-state", password=self._redis_password)

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
                    f"triton-{i}", ports, self.run_dir / f"triton-{i}.log",
                    models=self.triton_models or registry_models(self.registry_file),
                    repository=self.model_repository,
                    cpu_threads=max(1, (os.cpu_count() or 1) // len(self.ports.tritons)),
                    extra_args=self.triton_args(i), env=self.service_env.get("triton"))
            for i, ports in enumerate(self.ports.tritons):
                wait_triton_ready(self.processes[f"triton-{i}"], ports)
            registry = render_registry(self.registry_file, self.ports.tritons, self.semantic_cache)
            self.registry_path.write_text(yaml.safe_dump(registry))
            self.start_router()
            if self.with_cache or self.with_retrieval:
                self.start_milvus()
            if self.with_retrieval:
                self.start_retrieval()
            if self.with_cache:
                self.start_redis()
            if self.with_edge:
                self.start_state_redis()
            if self.with_cache:
                self.start_cache()
            if self.with_edge:
                self.start_ratelimit()
            self.start_gateways()
            if self.with_edge:
                self.start_edge()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def registry_path(self) -> Path:
        """The registry the router reads: the base registry with this stack's Triton replicas."""
        return self.run_dir / "registry.yaml"

    def _tracing_env(self, name: str) -> dict[str, str]:
        if not self.otlp_grpc:
            return {}
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.otlp_grpc}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_SERVICE_NAME": name}

    def triton_args(self, index: int) -> list[str]:
        args = [restricted_http_arg(self._triton_http_key)]
        if self.internal_tls:
            # Triton's gRPC with SSL and client certificates from the internal CA: only the router gets in.
            tls = self.internal_tls_of("triton")
            args += ["--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true", f"--grpc-server-cert={tls.cert}",
                     f"--grpc-server-key={tls.key}", f"--grpc-root-cert={tls.ca}"]
        if not self.otlp_http:
            return args
        return [*args, "--trace-config=mode=opentelemetry", "--trace-config=rate=1", "--trace-config=level=TIMESTAMPS",
                f"--trace-config=opentelemetry,url={self.otlp_http}/v1/traces",
                f"--trace-config=opentelemetry,resource=service.name=triton-{index}"]

    def internal_tls_of(self, identity: str) -> InternalTls:
        """The certificate settings of one mesh identity (tools/pki.py INTERNAL_IDENTITIES)."""
        pki = self.pki
        return InternalTls(cert=str(pki.internal_cert(identity)), key=str(pki.internal_key(identity)),
                           ca=str(pki.internal_ca))

    def admin_credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials of the admin identity when the stack runs internal mTLS (None: plaintext)."""
        return self.internal_tls_of("mesh-admin").channel_credentials() if self.internal_tls else None

    def _tls_env(self, service: str) -> dict[str, str]:
        if not self.internal_tls:
            return {}
        tls = self.internal_tls_of(service)
        prefix = f"MESH_{service.upper()}_TLS__"
        return {f"{prefix}CERT": tls.cert, f"{prefix}KEY": tls.key, f"{prefix}CA": tls.ca}

    def _start(self, name: str, env: dict[str, str], env_wins: bool = False) -> ManagedProcess:
        """env_wins: `env` over the stack's service_env (a process a test starts with settings of its own)."""
        service = name.split("-")[0]
        merged = {**env, **self._tracing_env(name), **self._tls_env(service), **self.service_env.get(service, {})}
        self.processes[name] = start_service(f"services.{service}", name, merged | env if env_wins else merged,
                                             self.run_dir / f"{name}.log")
        return self.processes[name]

    def start_router(self, name: str = "router", port: int = 0, metrics_port: int = 0) -> str:
        """Starts (or restarts) the router (or, with another name and ports, one more replica of it on the same
        registry and Triton) and returns its address once it is SERVING."""
        port = port or self.ports.router
        router = self._start(name, {
            "MESH_ROUTER_PORT": str(port),
            "MESH_ROUTER_REGISTRY_FILE": str(self.registry_path),
            "MESH_ROUTER_METRICS_PORT": str(metrics_port or self.ports.router_metrics),
        })
        address = f"127.0.0.1:{port}"
        wait_grpc_serving(address, router, 30, self.admin_credentials())
        return address

    def start_retrieval(self) -> None:
        retrieval = self._start("retrieval", {
            "MESH_RETRIEVAL_PORT": str(self.ports.retrieval),
            "MESH_RETRIEVAL_METRICS_PORT": str(self.ports.retrieval_metrics),
            "MESH_RETRIEVAL_MILVUS_URI": f"http://127.0.0.1:{self.ports.milvus}",
            "MESH_RETRIEVAL_ROUTER_ADDRESS": self.router_address,
            "MESH_RETRIEVAL_TOKENIZER_FILE": str(MODEL_REPOSITORY / "minilm" / "1" / "tokenizer.json"),
            # Milvus 2.3 (the `milvus` package's standalone) has no sparse vectors: dense search only there.
            "MESH_RETRIEVAL_LEXICAL_SEARCH": str(self.milvus_backend != "server").lower(),
        })
        wait_grpc_serving(self.retrieval_address, retrieval, 60, self.admin_credentials())

    def start_cache(self, name: str = "cache", port: int = 0, env: dict[str, str] | None = None) -> str:
        """Starts the cache service (or, with another name and port, a second one on the same Redis and Milvus,
        e.g. with a setting changed for a benchmark) and returns its address once it is SERVING."""
        port = port or self.ports.cache
        cache = self._start(name, {
            "MESH_CACHE_PORT": str(port),
            "MESH_CACHE_METRICS_PORT": str(self.ports.cache_metrics if name == "cache" else 0),
            "MESH_CACHE_REDIS_URL": self.cache_redis_url,
            "MESH_CACHE_MILVUS_URI": f"http://127.0.0.1:{self.ports.milvus}",
            "MESH_CACHE_ROUTER_ADDRESS": self.router_address,
            **(env or {}),
        })
        address = f"127.0.0.1:{port}"
        wait_grpc_serving(address, cache, 30, self.admin_credentials())
        return address

    @property
    def admin_database_url(self) -> str:
        return self.admin_db_url or f"sqlite:///{self.run_dir / 'admin.sqlite3'}"

    def start_ratelimit(self) -> None:
        """Starts (or restarts) the rate-limit service and waits until it is SERVING."""
        ratelimit = self._start("ratelimit", {
            "MESH_RATELIMIT_PORT": str(self.ports.ratelimit),
            "MESH_RATELIMIT_METRICS_PORT": str(self.ports.ratelimit_metrics),
            "MESH_RATELIMIT_REDIS_URL": self.state_redis_url,
            "MESH_RATELIMIT_TENANTS_FILE": str(self.tenants_file),
            "MESH_RATELIMIT_ADMIN__URL": self.admin_database_url,
        })
        wait_grpc_serving(self.ratelimit_address, ratelimit, 30, self.admin_credentials())

    def gateway_env(self, port: int, metrics_port: int, http_port: int = 0) -> dict[str, str]:
        return {
            "MESH_GATEWAY_PORT": str(port),
            "MESH_GATEWAY_HTTP_PORT": str(http_port),
            "MESH_GATEWAY_METRICS_PORT": str(metrics_port),
            "MESH_GATEWAY_ROUTER_ADDRESS": self.router_address,
            "MESH_GATEWAY_CACHE_ADDRESS": self.cache_address if self.with_cache else "",
            "MESH_GATEWAY_CACHE_REDIS_URL": self.cache_reader_url if self.with_cache else "",
            "MESH_GATEWAY_RETRIEVAL_ADDRESS": self.retrieval_address if self.with_retrieval else "",
            "MESH_GATEWAY_TENANTS_FILE": str(self.tenants_file),
            "MESH_GATEWAY_ADMIN__URL": self.admin_database_url,
            "MESH_GATEWAY_BUDGET_ADDRESS": self.ratelimit_address if self.with_edge else "",
            "MESH_GATEWAY_EDGE_SECRET": self._edge_secret if self.with_edge else "",
            # Every gateway of the stack reads and writes the same batch files (a shared volume in production).
            "MESH_GATEWAY_BATCH__FILES_DIR": str(self.run_dir / "files"),
        }

    def start_gateway(self, index: int) -> None:
        """Starts (or restarts) gateway replica `index` and waits until it is SERVING."""
        port, metrics_port = self.ports.gateway_ports()[index]
        name = "gateway" if index == 0 else f"gateway-{index}"
        http_ports = self.ports.gateway_http
        http_port = http_ports[index] if index < len(http_ports) else 0
        self.start_gateway_as(name, self.gateway_env(port, metrics_port, http_port))

    def start_gateway_as(self, name: str, env: dict[str, str]) -> str:
        """Starts a gateway process named `name` with `env` (gateway_env's, changed: the changes win over the
        stack's service_env) and returns its address once it is SERVING."""
        address = f"127.0.0.1:{env['MESH_GATEWAY_PORT']}"
        wait_grpc_serving(address, self._start(name, env, env_wins=True), 30, self.admin_credentials())
        return address

    def start_gateways(self) -> None:
        for index in range(len(self.ports.gateway_ports())):
            self.start_gateway(index)

    def edge_settings(self) -> EdgeSettings:
        pki = self.pki
        return EdgeSettings(**{
            "port": self.ports.edge, "admin_port": self.ports.edge_admin, "metrics_port": self.ports.edge_metrics,
            "gateways": self.gateway_addresses, "gateways_http": self.gateway_http_addresses,
            "ratelimit_address": self.ratelimit_address, "edge_secret": self._edge_secret,
            "tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "client_ca": str(pki.ca_cert),
            "jwks_file": str(pki.jwks), "otlp_address": self.otlp_grpc,
            **({"tls": self.internal_tls_of("edge")} if self.internal_tls else {}), **self.edge_overrides})

    def start_edge(self) -> None:
        settings = self.edge_settings()
        self.processes["envoy"] = start_envoy(settings, self.run_dir)
        wait_edge_ready(self.processes["envoy"], settings)

    def stop(self) -> None:
        # Edge first, Triton last, so in-flight work drains in the order it flows.
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        self.processes.clear()


def local_stack(args: argparse.Namespace) -> LocalStack:
    """`make up`'s stack: fixed ports, internal mTLS unless --plaintext-internal."""
    ports = StackPorts(args.gateway_port, args.router_port,
                       [TritonPorts(args.triton_grpc_port, args.triton_grpc_port - 1, args.triton_grpc_port + 1)],
                       cache=50053, redis=6379, milvus=19530, gateway_metrics=9101, cache_metrics=9103,
                       retrieval=50054, extra_gateways=[args.gateway_port + 10], extra_gateway_metrics=[9111],
                       edge=args.edge_port, edge_admin=9901, ratelimit=50055, ratelimit_metrics=9105,
                       router_metrics=9102, retrieval_metrics=9104, edge_metrics=9902,
                       state_redis=6380, gateway_http=[8080, 8090])
    return LocalStack(ROOT / "run", ports, internal_tls=not args.plaintext_internal)


def _up(args: argparse.Namespace) -> None:
    stack = local_stack(args)
    ports = stack.ports
    print("starting Triton, router, milvus-lite, retrieval, Redis, cache, rate limits, 2 gateways and Envoy "
          "(logs in run/) ...", flush=True)
    stack.start()
    # The first pid is this process: `make down` signals it, and it stops the others in order.
    (ROOT / "run" / "stack.pids").write_text("\n".join([str(os.getpid())] + [str(p.pid) for p in
                                                                            stack.processes.values()]))
    t = ports.tritons[0]
    pki = stack.pki
    internal = (f"mTLS (an admin client: {pki.internal_cert('mesh-admin').relative_to(ROOT)} and its key; "
                "--plaintext-internal turns it off)") if stack.internal_tls else "PLAINTEXT (--plaintext-internal)"
    print(f"""
inference mesh is up
  edge (public: TLS, JWT or API key, rate limits): {stack.edge_address}   (Envoy admin 127.0.0.1:{ports.edge_admin})
  gateways (InferenceMesh + KServe):       {", ".join(stack.gateway_addresses)}
  gateways (OpenAI API, HTTP):             {", ".join(stack.gateway_http_addresses)}   (public: https://{stack.edge_address}/v1)
  router (internal):                       {stack.router_address}
  cache (internal):                        {stack.cache_address}  redis :{ports.redis}  milvus-lite :{ports.milvus}
  retrieval (internal):                    {stack.retrieval_address}
  rate limits + token budgets (internal):  {stack.ratelimit_address}  redis (noeviction) :{ports.state_redis}
  triton:                                  grpc 127.0.0.1:{t.grpc}  http :{t.http}  metrics :{t.metrics}
  CA certificate (trust it):               {pki.ca_cert.relative_to(ROOT)}
  internal hops:                           {internal}
  dev API key:                             mesh-dev-key    (a JWT: .venv/bin/python -m tools.pki mint --tenant dev)

try it:
  .venv/bin/grpcurl -cacert {pki.ca_cert.relative_to(ROOT)} -H 'x-api-key: mesh-dev-key' \\
    -d '{{"model": "smollm2-135m-instruct", "max_tokens": 32,
         "messages": [{{"role": "ROLE_USER", "content": "Name three colours."}}]}}' \\
    localhost:{ports.edge} inference_mesh.v1.InferenceMesh/Generate
  curl --cacert {pki.ca_cert.relative_to(ROOT)} https://localhost:{ports.edge}/v1/chat/completions \\
    -H 'Authorization: Bearer mesh-dev-key' -H 'Content-Type: application/json' \\
    -d '{{"model": "smollm2-135m-instruct", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Name three colours."}}]}}'

Ctrl-C (or `make down`) stops everything.""", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            for process in stack.processes.values():
                process.ensure_alive()
    finally:
        # Ctrl-C reaches a pipe's reader too (`make up | tee up.log`): stdout may be gone, and stopping must not
        # depend on it.
        with contextlib.suppress(OSError):
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


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(required=True)
    up = sub.add_parser("up", help="start the stack in the foreground")
    up.add_argument("--edge-port", type=int, default=8443)
    up.add_argument("--gateway-port", type=int, default=50051)
    up.add_argument("--router-port", type=int, default=50052)
    up.add_argument("--triton-grpc-port", type=int, default=8001)
    up.add_argument("--plaintext-internal", action="store_true",
                    help="internal hops in plaintext on loopback, without mTLS: any local process may then call the "
                         "router, cache and retrieval directly as any tenant (measured cost of mTLS: BENCHMARKS.md)")
    up.set_defaults(func=_up)
    down = sub.add_parser("down", help="stop a stack started by `up`")
    down.set_defaults(func=_down)
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    args.func(args)


if __name__ == "__main__":
    main()

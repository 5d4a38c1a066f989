"""Triton replicas: one channel each, in-flight counts, readiness from probes and from failed calls, queue
state from each replica's metrics endpoint, drain flags; kept across registry reloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.breakers import Breaker
from services.common.channels import channel as mesh_channel
from services.common.deadlines import GENERATION_BUDGET_S
from services.common.internal_tls import InternalTls
from services.common.resilience import ResilienceSettings
from services.router.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class QueueState:
    """One Triton model on one replica, from its metrics endpoint."""

    pending: int = 0
    queue_ms: float = 0.0           # mean queue time of the requests finished since the previous scrape
    queue_us_total: float = 0.0     # the cumulative counters, to difference at the next scrape
    requests_total: float = 0.0


@dataclass
class Replica:
    name: str
    pool: str
    endpoint: str
    models: set[str]  # Triton model names this replica should serve
    stub: service_pb2_grpc.GRPCInferenceServiceStub
    channel: grpc.aio.Channel
    breaker: Breaker
    metrics_endpoint: str = ""
    # The name the replica's certificate carries when the endpoint is an address: callers streaming from it direct
    # (a placement lease) check it as the router does.
    authority: str = ""
    gpu_class: str = "cpu"
    in_flight: int = 0
    # Per Triton model: what a model's own bound (ModelSpec.max_in_flight_per_replica) counts.
    in_flight_by_model: dict[str, int] = field(default_factory=dict)
    ready_models: set[str] = field(default_factory=set)
    last_error: str = ""
    draining: bool = False
    queues: dict[str, QueueState] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return bool(self.ready_models)

    def serves(self, triton_model: str) -> bool:
        """Ready for the model, taking new work, and its circuit breaker lets a call through."""
        return not self.draining and triton_model in self.ready_models and self.breaker.available()

    def load(self, triton_model: str, queue_ms_per_slot: float) -> float:
        """Outstanding work as the queue-aware choice sees it: the larger of our own in-flight count and Triton's
        pending count (which includes other routers' requests), plus, while a queue exists, how slowly it moves
        (the recent mean queue time in request slots). An idle replica's load is its in-flight count: a queue
        that has drained says nothing about the next request."""
        queue = self.queues.get(triton_model, QueueState())
        slow_queue = queue.queue_ms / queue_ms_per_slot if queue.pending else 0.0
        return max(self.in_flight, queue.pending) + slow_queue

    def total_pending(self) -> int:
        return sum(q.pending for q in self.queues.values())

    def mean_queue_ms(self) -> float:
        return max((q.queue_ms for q in self.queues.values()), default=0.0)

    def in_flight_of(self, triton_model: str) -> int:
        return self.in_flight_by_model.get(triton_model, 0)

    def claim(self, triton_model: str) -> None:
        """Counts a request on this replica from the moment it is placed (admission hands out slots before the
        call starts: a slot must not be given twice)."""
        self.in_flight += 1
        self.in_flight_by_model[triton_model] = self.in_flight_of(triton_model) + 1

    def unclaim(self, triton_model: str) -> None:
        self.in_flight -= 1
        self.in_flight_by_model[triton_model] = self.in_flight_of(triton_model) - 1

    @contextlib.contextmanager
    def track(self, triton_model: str = "", claimed: bool = False) -> Iterator[None]:
        """In flight for the block (already counted when `claimed`), not after it."""
        if not claimed:
            self.claim(triton_model)
        try:
            yield
        finally:
            self.unclaim(triton_model)

    def mark_failed(self, error: str) -> None:
        """Called when a call fails with UNAVAILABLE: leave rotation now, the prober brings it back."""
        if self.ready_models:
            log.warning("replica out of rotation", extra={"replica": self.name, "error": error})
        self.ready_models.clear()
        self.last_error = error


class ReplicaSet:
    def __init__(self, registry: Registry, resilience: ResilienceSettings | None = None,
                 tls: InternalTls | None = None) -> None:
        self.replicas: list[Replica] = []
        self._resilience = resilience or ResilienceSettings()
        # Triton's gRPC SSL with client certificates: the router presents its own.
        self._tls = tls
        self.sync(registry)

    def sync(self, registry: Registry) -> list[Replica]:
        """Match the registry: keep replicas whose name and endpoint are unchanged (with their in-flight work,
        drain flag and channel), add new ones, and return the removed ones (their streams still hold them)."""
        current = {r.name: r for r in self.replicas}
        kept: list[Replica] = []
        retired: list[Replica] = []
        for pool_name, pool in registry.pools.items():
            hosted = {m.triton_model for m in registry.models.values() if pool_name in m.pool_names}
            for spec in pool.replicas:
                replica = current.pop(spec.name, None)
                if replica is None or replica.endpoint != spec.grpc:
                    if replica is not None:  # same name, new endpoint: a new replica
                        retired.append(replica)
                    channel = mesh_channel(spec.grpc, self._tls, spec.authority)
                    replica = Replica(name=spec.name, pool=pool_name, endpoint=spec.grpc, models=hosted,
                                      stub=service_pb2_grpc.GRPCInferenceServiceStub(channel), channel=channel,
                                      breaker=self._resilience.breaker(spec.name), authority=spec.authority)
                replica.pool, replica.models = pool_name, hosted
                replica.metrics_endpoint, replica.gpu_class = spec.metrics, pool.gpu_class
                kept.append(replica)
        self.replicas = kept
        return retired + list(current.values())

    def in_pool(self, pool: str) -> list[Replica]:
        return [r for r in self.replicas if r.pool == pool]

    def get(self, name: str) -> Replica | None:
        return next((r for r in self.replicas if r.name == name), None)

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas))


async def retire(replica: Replica, grace_s: float = 2 * GENERATION_BUDGET_S) -> None:
    """A replica removed from the registry: close its channel once its in-flight work is done. A call admitted
    before the removal ends within one generation budget; twice that also covers one that was retried."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while replica.in_flight and loop.time() < deadline:  # noqa: ASYNC110 - in_flight is a plain counter
        await asyncio.sleep(0.5)
    await replica.channel.close()


async def probe(replica: Replica, timeout_s: float) -> None:
    """ServerReady, then ModelReady for each hosted model; any failure takes the replica out of rotation."""
    try:
        server = await replica.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
        if not server.ready:
            replica.mark_failed("server not ready")
            return
        ready = set()
        for model in sorted(replica.models):
            answer = await replica.stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=timeout_s)
            if answer.ready:
                ready.add(model)
        if ready != replica.ready_models:
            log.info("replica readiness changed", extra={"replica": replica.name, "ready_models": sorted(ready)})
        replica.ready_models = ready
        replica.last_error = "" if ready else "no model ready"
        if ready:
            replica.breaker.healthy()
    except grpc.aio.AioRpcError as exc:
        replica.mark_failed(f"{exc.code().name}: {exc.details()}")


async def probe_forever(replicas: ReplicaSet, interval_s: float, timeout_s: float) -> None:
    while True:
        await asyncio.gather(*(probe(r, timeout_s) for r in replicas.replicas))
        await asyncio.sleep(interval_s)

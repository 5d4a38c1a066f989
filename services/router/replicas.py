"""Triton replicas: one channel each, in-flight counts, readiness from probes and from failed calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.server import insecure_channel
from services.router.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Replica:
    name: str
    pool: str
    endpoint: str
    models: set[str]  # Triton model names this replica should serve
    stub: service_pb2_grpc.GRPCInferenceServiceStub
    channel: grpc.aio.Channel
    in_flight: int = 0
    ready_models: set[str] = field(default_factory=set)
    last_error: str = ""

    @property
    def ready(self) -> bool:
        return bool(self.ready_models)

    def serves(self, triton_model: str) -> bool:
        return triton_model in self.ready_models

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def mark_failed(self, error: str) -> None:
        """Called when a call fails with UNAVAILABLE: leave rotation now, the prober brings it back."""
        if self.ready_models:
            log.warning("replica out of rotation", extra={"replica": self.name, "error": error})
        self.ready_models.clear()
        self.last_error = error


class ReplicaSet:
    def __init__(self, registry: Registry) -> None:
        self.replicas: list[Replica] = []
        for pool_name, pool in registry.pools.items():
            hosted = {m.triton_model for m in registry.models.values() if pool_name in m.pools}
            for spec in pool.replicas:
                channel = insecure_channel(spec.grpc)
                self.replicas.append(Replica(
                    name=spec.name, pool=pool_name, endpoint=spec.grpc, models=hosted,
                    stub=service_pb2_grpc.GRPCInferenceServiceStub(channel), channel=channel,
                ))

    def in_pool(self, pool: str) -> list[Replica]:
        return [r for r in self.replicas if r.pool == pool]

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas))


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
    except grpc.aio.AioRpcError as exc:
        replica.mark_failed(f"{exc.code().name}: {exc.details()}")


async def probe_forever(replicas: ReplicaSet, interval_s: float, timeout_s: float) -> None:
    while True:
        await asyncio.gather(*(probe(r, timeout_s) for r in replicas.replicas))
        await asyncio.sleep(interval_s)

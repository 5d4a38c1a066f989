"""The router's view of its replicas, read when Prometheus scrapes: readiness, in-flight work, Triton's queue
(pending requests and recent queue time per model, from the replica's own metrics) and breaker state."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.router.replicas import ReplicaSet


class ReplicaCollector(Collector):
    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily("mesh_router_replica_ready", "1 while the replica is ready and not draining",
                                  labels=["replica", "pool"])
        in_flight = GaugeMetricFamily("mesh_router_replica_in_flight", "Requests this router has on the replica",
                                      labels=["replica", "pool"])
        pending = GaugeMetricFamily("mesh_router_triton_queue_pending", "Requests waiting in the replica's Triton "
                                    "queue, per model (nv_inference_pending_request_count)",
                                    labels=["replica", "pool", "model"])
        queue_ms = GaugeMetricFamily("mesh_router_triton_queue_ms", "Mean queue time of the replica's recent "
                                     "requests, per model", labels=["replica", "pool", "model"])
        for replica in self._replicas.replicas:
            labels = [replica.name, replica.pool]
            ready.add_metric(labels, 1.0 if replica.ready and not replica.draining else 0.0)
            in_flight.add_metric(labels, replica.in_flight)
            for model, queue in replica.queues.items():
                pending.add_metric([*labels, model], queue.pending)
                queue_ms.add_metric([*labels, model], queue.queue_ms)
        yield from (ready, in_flight, pending, queue_ms)

"""Router process: registry, replicas, prober, KServe relay and admin service on one grpc.aio server."""

from __future__ import annotations

import asyncio
import logging

from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import router_pb2, router_pb2_grpc
from services.common.server import ServiceHost, run_service
from services.router.admin_service import RouterAdminService
from services.router.balancer import LeastOutstandingBalancer
from services.router.inference_service import RoutingInferenceService
from services.router.registry import Registry
from services.router.replicas import ReplicaSet, probe_forever
from services.router.settings import RouterSettings

log = logging.getLogger(__name__)


async def serve(settings: RouterSettings) -> None:
    registry = Registry.load(settings.registry_file)
    replicas = ReplicaSet(registry)
    balancer = LeastOutstandingBalancer(replicas)
    inference = RoutingInferenceService(registry, balancer, settings.default_timeout_s)

    host = ServiceHost("router", settings.address, settings.shutdown_grace_s,
                       settings.drain_delay_s)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, host.server)
    router_pb2_grpc.add_RouterAdminServicer_to_server(
        RouterAdminService(registry, replicas, balancer), host.server)
    host.expose([
        service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        router_pb2.DESCRIPTOR.services_by_name["RouterAdmin"].full_name,
    ])

    async def publish_health() -> None:
        # SERVING while at least one model has a ready replica: the router can do useful work.
        while True:
            await host.set_serving(inference.any_model_ready())
            await asyncio.sleep(settings.probe_interval_s / 2)

    async def probe() -> None:
        await probe_forever(replicas, settings.probe_interval_s, settings.probe_timeout_s)

    try:
        await host.run(background=[probe, publish_health])
    finally:
        await replicas.close()


def main() -> None:
    run_service("router", RouterSettings, serve)

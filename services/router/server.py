"""Router process: registry, replicas, prober, KServe relay and admin service on one grpc.aio server."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import router_pb2, router_pb2_grpc
from services.common.server import ServiceHost, run_service
from services.router.admin_service import RouterAdminService
from services.router.balancer import Balancer, BalancerSettings
from services.router.discovery import SrvDiscovery
from services.router.inference_service import RoutingInferenceService
from services.router.metrics import ReplicaCollector
from services.router.placement_service import PlacementService
from services.router.queue_metrics import scrape_forever
from services.router.replicas import probe_forever
from services.router.settings import RouterSettings
from services.router.state import RouterState

log = logging.getLogger(__name__)


async def serve(settings: RouterSettings) -> None:
    state = RouterState.load(settings.registry_file, settings.resilience, settings.tls)
    balancer = Balancer(state.replicas, BalancerSettings(
        settings.queue_ms_per_slot, settings.affinity_load_factor, settings.affinity_max_load,
        max_in_flight_per_replica=settings.max_in_flight_per_replica, placement_bounds=settings.fair_queuing))
    inference = RoutingInferenceService(state, balancer, settings, settings.resilience.retrier("replicas"))
    REGISTRY.register(ReplicaCollector(state.replicas))
    host = ServiceHost("router", settings, settings.max_in_flight)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, host.server)
    router_pb2_grpc.add_RouterAdminServicer_to_server(
        RouterAdminService(state, balancer, settings.queue_ms_per_slot, inference.admissions), host.server)
    router_pb2_grpc.add_PlacementLeasesServicer_to_server(
        PlacementService(inference, settings.stream_stall_timeout_s), host.server)
    host.expose([
        service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        router_pb2.DESCRIPTOR.services_by_name["RouterAdmin"].full_name,
        router_pb2.DESCRIPTOR.services_by_name["PlacementLeases"].full_name,
    ])

    async def a_model_is_ready() -> bool:
        return inference.any_model_ready()

    async def probe() -> None:
        await probe_forever(state.replicas, settings.probe_interval_s, settings.probe_timeout_s)

    async def scrape() -> None:
        await scrape_forever(state.replicas, settings.scrape_interval_s, settings.probe_timeout_s)

    async def watch() -> None:
        await state.watch(settings.registry_watch_s)

    async def discover() -> None:
        await state.discover_forever(SrvDiscovery(settings.dns_nameservers, settings.discovery_timeout_s),
                                     settings.discovery_interval_s)

    try:
        await host.run(background=[probe, scrape, watch, discover,
                                    host.serving_while(a_model_is_ready, settings.probe_interval_s / 2)])
    finally:
        await state.replicas.close()


def main() -> None:
    run_service("router", RouterSettings, serve)

"""Gateway process: public InferenceMesh and KServe services over one router channel."""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    batches_pb2,
    batches_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    retrieval_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.admin.directory import TenantDirectory
from services.admin.gate import AdminGate
from services.admin.service import AdminOps, AdminService
from services.admin.store import AdminStore
from services.admin.usage import UsageWriter
from services.cache.reads import CacheReads, redis_client
from services.common.model_catalog import ModelCatalog
from services.common.resilient_channel import resilient_channel
from services.common.server import ServiceHost, run_service
from services.gateway.admin_http import AdminHttp
from services.gateway.auth import Authenticates, Authenticator
from services.gateway.batches.api import BatchApi
from services.gateway.batches.grpc_service import BatchesService
from services.gateway.batches.http import NO_BATCHES, BatchesHttp, NoBatches
from services.gateway.batches.runner import BatchRunner
from services.gateway.batches.storage import open_storage
from services.gateway.batches.store import BatchStore
from services.gateway.budgets import SETTLE_MARGIN_S, TokenBudgets
from services.gateway.cache_client import CacheClient
from services.gateway.core import MeshCore
from services.gateway.documents import DocumentsRelay
from services.gateway.errors import from_rpc_error
from services.gateway.generation import GenerationStreams, RouterRelayed
from services.gateway.kserve_metering import KServeMeter
from services.gateway.kserve_proxy import KServeProxyService
from services.gateway.leased_generation import EngineChannels, Leased
from services.gateway.mesh_service import InferenceMeshService
from services.gateway.openai_http.app import OpenAIApi
from services.gateway.openai_http.batch_lines import run_line
from services.gateway.response_store import ResponseStore
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


async def serve(settings: GatewaySettings) -> None:
    directory = await asyncio.to_thread(TenantDirectory.open, settings.admin, settings.tenants_file)
    auth = Authenticator(directory.config, settings.edge_secret)
    directory.subscribe(auth.reload)
    resilience = settings.resilience
    channel = resilient_channel(settings.router_address, "router", resilience, settings.tls)
    router = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    catalog = ModelCatalog(router_pb2_grpc.RouterAdminStub(channel), settings.model_refresh_s,
                           settings.metadata_timeout_s)
    router_health = health_pb2_grpc.HealthStub(channel)
    serving = False
    cache_channel = resilient_channel(settings.cache_address, "cache", resilience, settings.tls) \
        if settings.cache_address else None
    cache_reads = CacheReads(redis_client(settings.cache_redis_url, settings.cache_fast_timeout_s)) \
        if cache_channel and settings.cache_redis_url else None
    cache = CacheClient(cache_channel, settings.cache_lookup_timeout_s, settings.cache_fast_timeout_s,
                        settings.cache_store_timeout_s, cache_reads,
                        resilience.breaker("cache-redis")) if cache_channel else None
    retrieval_channel = resilient_channel(settings.retrieval_address, "retrieval", resilience, settings.tls) \
        if settings.retrieval_address else None
    documents = DocumentsRelay(retrieval_pb2_grpc.RetrievalStub(retrieval_channel) if retrieval_channel else None)
    budget_channel = resilient_channel(settings.budget_address, "budget", resilience, settings.tls) \
        if settings.budget_address else None
    budgets = TokenBudgets(budget_channel, settings.budget_timeout_s, settings.budget_charge_timeout_s,
                           settings.budget_fail_open) if budget_channel else None
    public = (mesh_pb2.DESCRIPTOR.services_by_name["InferenceMesh"].full_name,
              service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
              batches_pb2.DESCRIPTOR.services_by_name["Batches"].full_name)
    host = ServiceHost("gateway", settings, settings.max_in_flight, party_share=settings.tenant_share_of_in_flight,
                       party_of=auth.tenant_of, answered=[Authenticates(auth, public)])
    engines = EngineChannels(settings.tls) if settings.token_path == "direct" else None
    streams: GenerationStreams = Leased(router_pb2_grpc.PlacementLeasesStub(channel), engines) \
        if engines is not None else RouterRelayed(router, resilience.retrier("router-streams"))
    usage = UsageWriter(directory.store, settings.usage)
    core = MeshCore(settings, catalog, router, streams, cache, documents, budgets, usage)
    mesh_pb2_grpc.add_InferenceMeshServicer_to_server(InferenceMeshService(core), host.server)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeProxyService(router, settings.generate_timeout_s, settings.metadata_timeout_s,
                           is_ready=lambda: serving,
                           meter=KServeMeter(budgets, catalog, settings.generate_timeout_s + SETTLE_MARGIN_S, usage),
                           limits=settings.kserve_limits), host.server)
    router_admin = router_pb2_grpc.RouterAdminStub(channel)

    async def replicas() -> router_pb2.ListReplicasResponse:
        try:
            return await router_admin.ListReplicas(router_pb2.ListReplicasRequest(),
                                                   timeout=settings.metadata_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "router") from None

    admin_ops = AdminOps(directory.store, AdminGate(settings.edge_secret), replicas=replicas)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(admin_ops), host.server)
    host.expose((*public, admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name))

    async def router_serves() -> bool:
        # A gateway without a router (or without the model list) can do nothing useful.
        nonlocal serving
        serving = False
        answer = await router_health.Check(health_pb2.HealthCheckRequest(), timeout=settings.metadata_timeout_s)
        serving = answer.status == health_pb2.HealthCheckResponse.SERVING and (
            catalog.loaded or await catalog.refresh())
        return serving

    batch_api, runner = _batches(settings, directory.store, core, auth)
    batches_pb2_grpc.add_BatchesServicer_to_server(BatchesService(batch_api, NO_BATCHES), host.server)
    http = await _start_http(settings, OpenAIApi(
        auth, core, host.shedder, is_ready=lambda: serving and not host.stopping,
        max_body_bytes=settings.kserve_limits.max_request_bytes, internal_tls=settings.tls.enabled,
        response_store=ResponseStore(cache_channel, settings.cache_store_timeout_s) if cache_channel else None,
        admin=AdminHttp(admin_ops), batches=BatchesHttp(batch_api) if batch_api else NoBatches())) \
        if settings.http_port else None
    try:
        await host.run(background=[host.serving_while(router_serves), catalog.refresh_forever, directory.follow,
                                   usage.run, *([runner.run] if runner is not None else [])])
    finally:
        directory.close()
        if http is not None:
            await http.cleanup()
        if cache is not None:
            await cache.drain()
            await cache_channel.close()
            if cache_reads is not None:
                await cache_reads.close()
        if retrieval_channel is not None:
            await retrieval_channel.close()
        if budgets is not None:
            await budgets.drain()
            await budget_channel.close()
        if engines is not None:
            await engines.close()
        await channel.close()


def _batches(settings: GatewaySettings, store: AdminStore | None, core: MeshCore,
             auth: Authenticator) -> tuple[BatchApi | None, BatchRunner | None]:
    """The Files and Batches API and this replica's share of the batch work, where there is a database to keep
    them in."""
    if store is None or not settings.batch.enabled:
        return None, None
    batch_store = BatchStore(store.engine)
    files = open_storage(settings.batch)
    runner = BatchRunner(batch_store, files, settings.batch,
                         lambda caller, endpoint, body, timeout_s: run_line(core, caller, endpoint, body, timeout_s),
                         auth.caller_for)
    return BatchApi(batch_store, files, settings.batch, core), runner


async def _start_http(settings: GatewaySettings, api: OpenAIApi) -> web.AppRunner:
    """The OpenAI-compatible API on its own port, on this event loop. A client that disconnects cancels its
    handler (and so its generation); a stop lets in-flight requests finish within the grace period."""
    settings.tls.check_listen_address(f"{settings.host}:{settings.http_port}")
    runner = web.AppRunner(api.application(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.shutdown_grace_s)
    await runner.setup()
    ssl_context = settings.tls.ssl_server_context() if settings.tls.enabled else None
    await web.TCPSite(runner, settings.host, settings.http_port, ssl_context=ssl_context).start()
    log.info("listening", extra={"address": f"{settings.host}:{settings.http_port}", "service": "gateway-http"})
    return runner


def main() -> None:
    run_service("gateway", GatewaySettings, serve)

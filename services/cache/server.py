"""Cache process: ResponseCache + CacheAdmin on grpc.aio, metrics on their own port."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import cache_pb2, cache_pb2_grpc, router_pb2_grpc
from services.cache import metrics
from services.cache.calibration import SemanticCalibration
from services.cache.gate import load_gate
from services.cache.semantic import SemanticIndex
from services.cache.service import CacheAdminService, ResponseCacheService
from services.cache.settings import CacheSettings
from services.cache.store import RedisStore
from services.cache.stored_responses import StoredResponsesService
from services.common.model_catalog import ModelCatalog
from services.common.resilient_channel import resilient_channel
from services.common.server import ServiceHost, run_service

log = logging.getLogger(__name__)


async def serve(settings: CacheSettings) -> None:
    store = RedisStore(settings.redis_url, settings.redis_timeout_s)
    router_channel = resilient_channel(settings.router_address, "router", settings.resilience, settings.tls)
    catalog = ModelCatalog(router_pb2_grpc.RouterAdminStub(router_channel), settings.model_refresh_s,
                           settings.embed_timeout_s)
    calibration = SemanticCalibration.load()
    # A default budget without a calibration for this embedder would make every semantic lookup a guess: refuse.
    calibration.check(settings.semantic_max_false_hit_rate, settings.embedder_model)
    index = SemanticIndex(settings.milvus_uri, settings.milvus_collection,
                          lambda: catalog.embed_dimension(settings.embedder_model), settings.hnsw,
                          settings.milvus_timeouts, settings.semantic_max_chars) if settings.milvus_uri else None
    # WordNet is read before serving: a cache that cannot explain differences must not start serving similar
    # questions (WordNetMissing names the package to install).
    gate = load_gate(settings.wordnet_dir) if index is not None and settings.semantic_gate else None
    host = ServiceHost("cache", settings)
    cache_pb2_grpc.add_ResponseCacheServicer_to_server(
        ResponseCacheService(settings, store, index, service_pb2_grpc.GRPCInferenceServiceStub(router_channel),
                             calibration, gate),
        host.server)
    cache_pb2_grpc.add_CacheAdminServicer_to_server(CacheAdminService(store, index), host.server)
    cache_pb2_grpc.add_StoredResponsesServicer_to_server(
        StoredResponsesService(store, settings.stored_response_ttl_s), host.server)
    host.expose([cache_pb2.DESCRIPTOR.services_by_name[name].full_name
                 for name in ("ResponseCache", "CacheAdmin", "StoredResponses")])
    async def redis_answers() -> bool:
        # Without Redis the cache can only say UNAVAILABLE.
        size, memory = await store.stats()
        metrics.ENTRIES.set(size)
        metrics.MEMORY_BYTES.set(memory)
        return True

    async def keep_index() -> None:
        # Reconnects after Milvus comes back, and drops expired rows now and then.
        if index is None:
            return
        ticks = 0
        while True:
            if not index.ready:
                await index.connect()
            elif ticks % 60 == 0:
                with contextlib.suppress(Exception):
                    await index.delete_expired()
            ticks += 1
            await asyncio.sleep(1.0)

    try:
        await host.run(background=[host.serving_while(redis_answers), keep_index])
    finally:
        await store.close()
        if index is not None:
            await index.close()
        await router_channel.close()


def main() -> None:
    run_service("cache", CacheSettings, serve)

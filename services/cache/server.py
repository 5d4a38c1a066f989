"""Cache process: ResponseCache + CacheAdmin on grpc.aio, metrics on their own port."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import start_http_server
from redis.exceptions import RedisError
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import cache_pb2, cache_pb2_grpc
from services.cache import metrics
from services.cache.semantic import SemanticIndex
from services.cache.service import CacheAdminService, ResponseCacheService
from services.cache.settings import CacheSettings
from services.cache.store import RedisStore
from services.common.resilient_channel import resilient_channel
from services.common.server import ServiceHost, run_service

log = logging.getLogger(__name__)


async def serve(settings: CacheSettings) -> None:
    store = RedisStore(settings.redis_url, settings.redis_timeout_s)
    index = SemanticIndex(settings.milvus_uri, settings.milvus_collection, settings.embedder_dimension,
                          settings.hnsw_m, settings.hnsw_ef_construction, settings.hnsw_ef,
                          settings.milvus_timeout_s) if settings.milvus_uri else None
    router_channel = resilient_channel(settings.router_address, "router", settings.resilience, settings.tls)
    host = ServiceHost("cache", settings.address, settings.shutdown_grace_s,
                       settings.drain_delay_s, tls=settings.tls)
    cache_pb2_grpc.add_ResponseCacheServicer_to_server(
        ResponseCacheService(settings, store, index, service_pb2_grpc.GRPCInferenceServiceStub(router_channel)),
        host.server)
    cache_pb2_grpc.add_CacheAdminServicer_to_server(CacheAdminService(store, index), host.server)
    host.expose([cache_pb2.DESCRIPTOR.services_by_name[name].full_name for name in ("ResponseCache", "CacheAdmin")])
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)

    async def watch_redis() -> None:
        # SERVING while Redis answers: without it the cache can only say UNAVAILABLE.
        while True:
            try:
                await store.redis.ping()
                await host.set_serving(True)
                size, memory = await store.stats()
                metrics.ENTRIES.set(size)
                metrics.MEMORY_BYTES.set(memory)
            except RedisError:
                await host.set_serving(False)
            await asyncio.sleep(1.0)

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
        await host.run(background=[watch_redis, keep_index])
    finally:
        await store.close()
        if index is not None:
            await index.close()
        await router_channel.close()


def main() -> None:
    run_service("cache", CacheSettings, serve)

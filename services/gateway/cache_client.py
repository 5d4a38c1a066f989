"""The gateway's use of the cache: every call bounded, every failure a bypass (never an error).

Exact hits are read from Redis directly when the gateway is given its address (`cache_redis_url`): a hit then
costs two Redis reads instead of a gRPC hop to the cache service and its two Redis reads. Misses, semantic
lookups, leases and every write still go through the cache service."""

from __future__ import annotations

import logging
from collections.abc import Coroutine

import grpc
import numpy as np
from prometheus_client import Counter
from redis.exceptions import RedisError

from inference_mesh.v1 import cache_pb2, cache_pb2_grpc, mesh_pb2
from services.cache.reads import LOOKUPS, CacheReads
from services.common.background import BackgroundCalls
from services.common.breakers import Breaker, BreakerOpenError
from services.gateway.errors import from_rpc_error

log = logging.getLogger(__name__)
CACHE_BYPASSED = Counter("mesh_gateway_cache_unavailable_total",
                         "Requests served without the cache because it did not answer", ["call"])


def is_deterministic(request: mesh_pb2.GenerateRequest) -> bool:
    """Only these are cached: the same request gives the same text."""
    return (request.HasField("temperature") and request.temperature == 0.0) or request.HasField("seed")


class CacheClient:
    def __init__(self, channel: grpc.aio.Channel, lookup_timeout_s: float, fast_timeout_s: float,
                 store_timeout_s: float, reads: CacheReads | None = None, reads_breaker: Breaker | None = None
                 ) -> None:
        self._stub = cache_pb2_grpc.ResponseCacheStub(channel)
        self._lookup_timeout_s = lookup_timeout_s
        self._fast_timeout_s = fast_timeout_s
        self._store_timeout_s = store_timeout_s
        self._background = BackgroundCalls()
        self._reads = reads
        self._reads_breaker = reads_breaker or Breaker("cache-redis")

    async def _read(self, name: str, coroutine: Coroutine):
        """A direct Redis read; (False, None) when Redis failed or its breaker is open, so that a Redis that hangs
        costs its timeout a few times, not on every request."""
        try:
            self._reads_breaker.admit()
        except BreakerOpenError:
            coroutine.close()
            CACHE_BYPASSED.labels(name).inc()
            return False, None
        try:
            value = await coroutine
        except (RedisError, OSError) as exc:
            self._reads_breaker.record(grpc.StatusCode.UNAVAILABLE, str(exc))
            CACHE_BYPASSED.labels(name).inc()
            log.warning("cache redis unavailable", extra={"call": name, "error": str(exc)})
            return False, None
        except BaseException:
            self._reads_breaker.abandon()
            raise
        self._reads_breaker.record(None)
        return True, value

    async def exact_hit(self, scope: cache_pb2.CacheScope,
                        request: mesh_pb2.GenerateRequest) -> cache_pb2.CachedResponse | None:
        """The stored answer to exactly this request, read directly; None: a miss, or no direct reads (then the
        cache service's Lookup decides, and counts)."""
        if self._reads is None:
            return None
        _, cached = await self._read("exact_read", self._reads.exact_response(scope, request))
        if cached is not None:
            LOOKUPS.labels("response", "exact_hit").inc()
        return cached

    async def _call(self, name: str, coroutine: Coroutine):
        try:
            return await coroutine
        except grpc.aio.AioRpcError as exc:
            CACHE_BYPASSED.labels(name).inc()
            log.warning("cache unavailable", extra={"call": name, "status": exc.code().name, "error": exc.details()})
            return None

    async def lookup(self, request: cache_pb2.LookupRequest, deadline_s: float) -> cache_pb2.LookupReply | None:
        timeout = min(self._lookup_timeout_s, deadline_s)
        return await self._call("lookup", self._stub.Lookup(request, timeout=timeout))

    async def get_embeddings(self, scope: cache_pb2.CacheScope,
                             texts: list[str]) -> list[np.ndarray | None] | None:
        """Each text's stored vector (None where there is none); None when the cache did not answer."""
        if self._reads is not None:
            answered, vectors = await self._read("get_embeddings", self._reads.embeddings(scope, texts))
            if answered:
                hits = sum(v is not None for v in vectors)
                LOOKUPS.labels("embedding", "hit").inc(hits)
                LOOKUPS.labels("embedding", "miss").inc(len(vectors) - hits)
                return vectors
            # Redis did not answer this gateway (or its breaker is still open after Redis came back): the cache
            # service may still reach it.
        reply = await self._call("get_embeddings", self._stub.GetEmbeddings(
            cache_pb2.GetEmbeddingsRequest(scope=scope, texts=texts), timeout=self._fast_timeout_s))
        if reply is None:
            return None
        return [np.asarray(e.values, dtype=np.float32) if e.values else None for e in reply.embeddings]

    async def report_wrong_hit(self, request: cache_pb2.ReportWrongHitRequest,
                               deadline_s: float) -> cache_pb2.ReportWrongHitReply:
        """Unlike lookups, a report the cache cannot take is the caller's error to see (UNAVAILABLE): it asked
        for something to happen."""
        try:
            return await self._stub.ReportWrongHit(request, timeout=min(self._store_timeout_s, deadline_s))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "cache") from exc

    def in_background(self, name: str, coroutine: Coroutine) -> None:
        """Stores and releases run after the reply: the caller never waits for them."""
        self._background.start(self._call(name, coroutine))

    def store(self, request: cache_pb2.StoreRequest) -> None:
        self.in_background("store", self._stub.Store(request, timeout=self._store_timeout_s))

    def release(self, request: cache_pb2.ReleaseRequest) -> None:
        self.in_background("release", self._stub.Release(request, timeout=self._fast_timeout_s))

    def put_embeddings(self, request: cache_pb2.PutEmbeddingsRequest) -> None:
        self.in_background("put_embeddings", self._stub.PutEmbeddings(request, timeout=self._store_timeout_s))

    async def drain(self, timeout_s: float = 5.0) -> None:
        await self._background.drain(timeout_s)

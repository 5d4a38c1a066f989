"""Reading exact cache entries from Redis: the cache service's lookups, and the gateways' own reads of exact hits.

A gateway that reads an exact entry itself saves a whole gRPC hop (the largest single cost of a cache hit in the
profile, BENCHMARKS.md "Hot path profile"). Only reads live here: writes, leases against stampedes, semantic
search and flushes stay in the cache service, so a gateway needs read-only access to Redis (compose gives it a
Redis user that may only GET and MGET under `mesh:`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from prometheus_client import Counter

from inference_mesh.v1 import cache_pb2, mesh_pb2
from services.cache import keys
from services.common.redis_connection import RedisClient, connect, is_cluster

# One counter for every process that reads the cache (the cache service and each gateway's direct reads): a
# dashboard's hit rate sums it over all of them, and each lookup is counted once, where it was decided.
# How long a lookup waits for an identical in-flight generation's answer (stampede protection) before it
# generates on its own. Here, in the module gateways read, because their lookup timeout is derived from it.
STAMPEDE_WAIT_S = 20.0

LOOKUPS = Counter("mesh_cache_lookups_total", "Cache lookups by kind and result", ["kind", "result"])


def redis_client(url: str, timeout_s: float) -> RedisClient:
    """A client that fails within `timeout_s` instead of retrying: the caller goes around the cache."""
    return connect(url, timeout_s, retry_on_timeout=False, health_check_interval=0)


def _generation(tenant_gen: bytes | None, model_gen: bytes | None) -> str:
    return f"{int(tenant_gen or 0)}.{int(model_gen or 0)}"


class CacheReads:
    def __init__(self, redis: RedisClient, remembered_scopes: int = 10_000) -> None:
        self.redis = redis
        # On a Redis Cluster a tenant's keys share a slot (keys.slot_tag) but a model's flush counter lives
        # in another: it is read after the entries, which is as good, because counters only grow (the same value
        # after the entries were read means the same value when they were read).
        self._cluster = is_cluster(redis)
        # The last flush generation seen per (tenant, model): a read asks for the counters and the entries under
        # that generation in one MGET, which Redis answers atomically, so the entries are valid exactly when the
        # counters it returns still say that generation. Only after a flush does a read take a second round trip.
        self._generations: dict[tuple[str, str], str] = {}
        self._remembered_scopes = remembered_scopes

    async def close(self) -> None:
        await self.redis.aclose()

    async def generation(self, scope: cache_pb2.CacheScope) -> str:
        """Flush counters of the tenant and the model: bumping either orphans every older key at once."""
        tenant_gen, model_gen, _ = await self._counters_then([keys.tenant_generation_key(scope.tenant),
                                                              keys.model_generation_key(scope.model)])
        return _generation(tenant_gen, model_gen)

    async def _counters_then(self, keys_to_read: list[str]) -> tuple[bytes | None, bytes | None, list]:
        """(tenant counter, model counter, values of the keys after the two counters in `keys_to_read`), read as
        of one moment: one MGET on a single Redis; on a cluster one MGET in the tenant's slot, then the model's
        counter."""
        tenant_counter, model_counter, *entries = keys_to_read
        if not self._cluster:
            tenant_gen, model_gen, *values = await self.redis.mget(keys_to_read)
            return tenant_gen, model_gen, values
        tenant_gen, *values = await self.redis.mget([tenant_counter, *entries])
        return tenant_gen, await self.redis.get(model_counter), values

    async def get_response(self, key: str) -> cache_pb2.CachedResponse | None:
        raw = await self.redis.get(key)
        return cache_pb2.CachedResponse.FromString(raw) if raw else None

    async def get_embeddings(self, embedding_keys: list[str]) -> list[np.ndarray | None]:
        raws = await self.redis.mget(embedding_keys)
        return [np.frombuffer(raw, dtype=np.float32) if raw else None for raw in raws]

    async def _read_current(self, scope: cache_pb2.CacheScope, keys_under: Callable[[str], list[str]]
                            ) -> list[bytes | None]:
        """The values of `keys_under(generation)` for the scope's current flush generation."""
        counters = [keys.tenant_generation_key(scope.tenant), keys.model_generation_key(scope.model)]
        remembered = self._generations.get((scope.tenant, scope.model))
        if remembered is not None:
            tenant_gen, model_gen, values = await self._counters_then([*counters, *keys_under(remembered)])
            current = _generation(tenant_gen, model_gen)
            if current == remembered:
                return values
        else:
            current = await self.generation(scope)
        if len(self._generations) >= self._remembered_scopes:
            self._generations.clear()
        self._generations[(scope.tenant, scope.model)] = current
        tenant_gen, model_gen, values = await self._counters_then([*counters, *keys_under(current)])
        if _generation(tenant_gen, model_gen) != current:
            return [None] * len(values)  # flushed between the two reads: whatever was there is orphaned now
        return values

    async def exact_response(self, scope: cache_pb2.CacheScope,
                             request: mesh_pb2.GenerateRequest) -> cache_pb2.CachedResponse | None:
        """The stored answer to exactly this request in this scope, if any (never a semantic match)."""
        digest = keys.exact_digest(request)
        (raw,) = await self._read_current(scope, lambda generation: [keys.response_key_of(scope, generation, digest)])
        return cache_pb2.CachedResponse.FromString(raw) if raw else None

    async def embeddings(self, scope: cache_pb2.CacheScope, texts: list[str]) -> list[np.ndarray | None]:
        """The stored vector of each text in this scope, None where there is none."""
        digests = [keys.text_digest(t) for t in texts]
        raws = await self._read_current(
            scope, lambda generation: [keys.embedding_key_of(scope, generation, d) for d in digests])
        return [np.frombuffer(raw, dtype=np.float32) if raw else None for raw in raws]

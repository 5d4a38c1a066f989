"""Redis: responses and embeddings with TTLs, leases for stampede protection, generation counters."""

from __future__ import annotations

import secrets

import numpy as np

from inference_mesh.v1 import cache_pb2
from services.cache import keys
from services.cache.reads import CacheReads, redis_client
from services.common.redis_connection import key_count_and_memory

# Releases a lease only if the caller still holds it (a lease that expired may belong to someone else now).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisStore(CacheReads):
    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__(redis_client(url, timeout_s))
        self._release = self.redis.register_script(_RELEASE)

    async def bump(self, tenant: str = "", model: str = "") -> None:
        # Not one transaction: the two counters may live in two slots of a cluster, and each bump alone orphans
        # what it covers.
        async with self.redis.pipeline(transaction=False) as pipe:
            if tenant:
                pipe.incr(keys.tenant_generation_key(tenant))
            if model:
                pipe.incr(keys.model_generation_key(model))
            await pipe.execute()

    async def put_response(self, key: str, response: cache_pb2.CachedResponse, ttl_s: int) -> int:
        raw = response.SerializeToString()
        await self.redis.set(key, raw, ex=ttl_s)
        return len(raw)

    async def take_lease(self, key: str, lease_s: float) -> str:
        token = secrets.token_hex(16)
        taken = await self.redis.set(keys.lease_key(key), token, nx=True, px=int(lease_s * 1000))
        return token if taken else ""

    async def lease_held(self, key: str) -> bool:
        return bool(await self.redis.exists(keys.lease_key(key)))

    async def release_lease(self, key: str, token: str) -> None:
        await self._release(keys=[keys.lease_key(key)], args=[token])

    async def wrong_entries(self, key: str) -> set[str]:
        """Semantic entries reported as wrong answers to the question stored (or to be stored) under `key`."""
        return {m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(keys.wrong_hits_key(key))}

    async def report_wrong(self, key: str, entry: str, negative: str, ttl_s: int, keep: int) -> None:
        """Excludes `entry` for this question for as long as entries live, and keeps the pair for calibration."""
        # Two slots on a cluster (the question's tenant, the shared list): two independent steps.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(keys.wrong_hits_key(key), entry)
            pipe.expire(keys.wrong_hits_key(key), ttl_s)
            pipe.lpush(keys.NEGATIVES_KEY, negative)
            pipe.ltrim(keys.NEGATIVES_KEY, 0, keep - 1)
            await pipe.execute()

    async def negatives(self) -> list[str]:
        return [n.decode() if isinstance(n, bytes) else n for n in await self.redis.lrange(keys.NEGATIVES_KEY, 0, -1)]

    async def put_embeddings(self, embedding_keys: list[str], vectors: list[np.ndarray], ttl_s: int) -> int:
        stored = 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, vector in zip(embedding_keys, vectors, strict=True):
                raw = np.asarray(vector, dtype=np.float32).tobytes()
                pipe.set(key, raw, ex=ttl_s)
                stored += len(raw)
            await pipe.execute()
        return stored

    async def stats(self) -> tuple[int, int]:
        """(keys in the database, bytes of memory Redis uses)."""
        return await key_count_and_memory(self.redis)

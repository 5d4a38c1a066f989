"""Request decisions from a quota leased per rate-limit replica: most requests are decided in memory, without a
Redis call.

A replica takes a lease of up to `size` tokens from the tenant's shared bucket in one Lua call and spends it
locally; when it runs out (or the lease is older than `ttl_s`) it gives back what is left and leases again in
the same call. Tokens are taken before they are spent, so the mesh never admits more than the bucket allows:
there is no overshoot across replicas. The price is the other way: while replica A holds unspent tokens,
replica B may refuse a request the bucket as a whole could have admitted. At most `size` tokens per replica
are held like that, for at most `ttl_s` (a sweep gives back expired leases), plus whatever a crashed replica
held, which the bucket refills at its rate. Lease size is a fraction of the tier's burst, so a small burst is
decided call by call, exactly as without leases.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.ratelimit.buckets import BucketState, LimitStore


@dataclass
class _Lease:
    tokens: float        # leased and not yet spent
    level: float         # the shared bucket's level when the lease was taken (for the remaining-requests header)
    expires_at: float
    requests_per_minute: int
    burst: int


@dataclass(frozen=True)
class LeaseSettings:
    # A lease is this share of the tier's burst, at most `max_size` tokens; below 2 tokens there is no lease.
    burst_fraction: float = 0.1
    max_size: int = 100
    ttl_s: float = 1.0

    def size(self, burst: int) -> int:
        size = min(self.max_size, math.floor(burst * self.burst_fraction))
        return size if size >= 2 else 0


class LeasedRequests:
    def __init__(self, store: LimitStore, settings: LeaseSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def held(self, tenant: str) -> float:
        lease = self._leases.get(tenant)
        return lease.tokens if lease else 0.0

    async def take(self, tenant: str, requests_per_minute: int, burst: int, hits: int = 1) -> BucketState:
        size = self._settings.size(burst)
        if size <= hits:
            return await self._store.take_request(tenant, requests_per_minute, burst, hits)
        spent = self._spend(tenant, hits)
        if spent is not None:
            return spent
        # One lease call per tenant at a time: requests that arrive meanwhile wait for it and spend from it, or a
        # burst of concurrent first requests would each take a whole lease and hoard the bucket.
        async with self._locks.setdefault(tenant, asyncio.Lock()):
            spent = self._spend(tenant, hits)
            if spent is not None:
                return spent
            lease = self._leases.pop(tenant, None)
            state = await self._store.lease_requests(tenant, requests_per_minute, burst, hits, size,
                                                     lease.tokens if lease else 0.0)
            if not state.allowed:
                return state
            left = state.granted - hits
            if left > 0:
                self._leases[tenant] = _Lease(left, state.level, self._clock() + self._settings.ttl_s,
                                              requests_per_minute, burst)
            return BucketState(True, state.level + left, 0.0)

    def _spend(self, tenant: str, hits: int) -> BucketState | None:
        lease = self._leases.get(tenant)
        if lease is None or lease.expires_at <= self._clock() or lease.tokens < hits:
            return None
        lease.tokens -= hits
        return BucketState(True, lease.level + lease.tokens, 0.0)

    async def give_back_expired(self) -> int:
        """Returns the unspent tokens of leases past their time to the shared buckets; how many leases."""
        now = self._clock()
        expired = [(tenant, lease) for tenant, lease in self._leases.items() if lease.expires_at <= now]
        for tenant, _ in expired:
            del self._leases[tenant]  # before the await: nothing spends a lease while it is given back
        for tenant, lease in expired:
            if lease.tokens > 0:
                await self._store.give_back(tenant, lease.requests_per_minute, lease.burst, lease.tokens)
        return len(expired)

"""Request limits from leased quotas (services/ratelimit/leases.py) on a real Redis: several replicas never admit
more than the shared bucket holds, unspent leases go back, a small burst is decided call by call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from services.ratelimit.buckets import LimitStore
from services.ratelimit.leases import LeasedRequests, LeaseSettings
from tools.backends import start_redis
from tools.processes import free_port

# One request per minute of refill: over a test's few seconds the bucket holds what its burst says, no more.
SLOW = 1


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = start_redis(port, tmp_path_factory.mktemp("leases") / "redis.log", role="state")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.stop()


def _stores(redis_url: str, count: int) -> list[LimitStore]:
    return [LimitStore(redis_url, "test-leases", 1.0) for _ in range(count)]


async def _close(stores: list[LimitStore]) -> None:
    for store in stores:
        await store.close()


def test_replicas_with_leases_never_admit_more_than_the_bucket(redis_url):
    async def run() -> tuple[int, list[float]]:
        stores = _stores(redis_url, 3)
        replicas = [LeasedRequests(store, LeaseSettings(burst_fraction=0.2, max_size=10)) for store in stores]
        tenant = f"t-{uuid.uuid4().hex[:8]}"

        async def one(replica: LeasedRequests) -> bool:
            return (await replica.take(tenant, SLOW, 50)).allowed
        try:
            # 3 replicas x 40 concurrent requests against a burst of 50: leases of 10 are taken and spent at once.
            outcomes = await asyncio.gather(*(one(replicas[i % 3]) for i in range(120)))
            return sum(outcomes), [replica.held(tenant) for replica in replicas]
        finally:
            await _close(stores)

    admitted, held = asyncio.run(run())
    assert admitted + sum(held) == 50, (admitted, held)
    assert admitted >= 50 - 3 * 10, "at most one lease per replica held back"


def test_leases_decide_most_requests_without_redis_and_give_back_what_is_left(redis_url):
    async def run() -> None:
        (store,) = _stores(redis_url, 1)
        now = [100.0]
        replica = LeasedRequests(store, LeaseSettings(burst_fraction=0.1, max_size=100, ttl_s=1.0),
                                 clock=lambda: now[0])
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        calls = 0
        take = store.lease_requests

        async def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return await take(*args, **kwargs)
        store.lease_requests = counted  # count the Redis calls; the store itself is real
        try:
            states = [await replica.take(tenant, SLOW, 200) for _ in range(40)]
            assert all(s.allowed for s in states) and calls == 2, "leases of 20: two Redis calls for 40 requests"
            assert [round(s.level) for s in states[:3]] == [199, 198, 197], "remaining counts the lease"
            assert replica.held(tenant) == 0
            await replica.take(tenant, SLOW, 200)
            assert replica.held(tenant) == 19
            now[0] += 1.5
            assert await replica.give_back_expired() == 1
            assert replica.held(tenant) == 0
            # What is left in the shared bucket: 200 - 41 taken; a plain take of exactly that succeeds, one more not.
            assert (await store.take_request(tenant, SLOW, 200, 159)).allowed
            assert not (await store.take_request(tenant, SLOW, 200, 1)).allowed
        finally:
            await store.close()

    asyncio.run(run())


def test_a_small_burst_is_decided_call_by_call(redis_url):
    async def run() -> None:
        (store,) = _stores(redis_url, 1)
        replica = LeasedRequests(store, LeaseSettings(burst_fraction=0.1, max_size=100))
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        try:
            outcomes = [(await replica.take(tenant, SLOW, 10)).allowed for _ in range(12)]
            assert outcomes == [True] * 10 + [False] * 2 and replica.held(tenant) == 0
            refused = await replica.take(tenant, SLOW, 10)
            assert not refused.allowed and refused.wait_s > 0
        finally:
            await store.close()

    asyncio.run(run())


def test_a_refused_lease_says_when_to_retry(redis_url):
    async def run() -> None:
        (store,) = _stores(redis_url, 1)
        replica = LeasedRequests(store, LeaseSettings(burst_fraction=0.5, max_size=100))
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        try:
            assert [(await replica.take(tenant, 60, 4)).allowed for _ in range(4)] == [True] * 4
            refused = await replica.take(tenant, 60, 4)
            assert not refused.allowed and 0 < refused.wait_s <= 1.0, refused
        finally:
            await store.close()

    asyncio.run(run())

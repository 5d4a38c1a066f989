"""The TokenBudget service's decisions (services/ratelimit/token_budget.py) over a store held in memory: which
window refuses, when to come back, and what a store failure tells the gateway. The store's own arithmetic runs
in Redis's Lua and is tested against a real Redis (tests/integration/test_rate_limit_leases.py)."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from inference_mesh.v1 import quota_pb2
from services.common.errors import MeshError
from services.common.tenants import Tenant, TenantConfig, Tier
from services.ratelimit.buckets import BucketState
from services.ratelimit.token_budget import TokenBudgetService

CONFIG = TenantConfig(tiers={"small": Tier(requests_per_minute=60, burst=10, tokens_per_minute=1000,
                                           tokens_per_month=50_000)},
                      tenants=[Tenant(id="t1", tier="small")])
NOW = dt.datetime(2026, 12, 31, 23, 0, tzinfo=dt.UTC)


class MemoryStore:
    def __init__(self, minute: BucketState, month_used: int = 0, fails: bool = False) -> None:
        self.minute, self.used, self.fails = minute, month_used, fails

    async def minute_tokens(self, tenant: str, tokens_per_minute: int, charge: int = 0) -> BucketState:
        if self.fails:
            raise RedisConnectionError("redis://:secret@10.0.0.5:6379 refused")
        return self.minute

    async def month_used(self, tenant: str, now: dt.datetime) -> int:
        return self.used


def _bucket(level: float, allowed: bool, wait_s: float = 0.0) -> BucketState:
    return BucketState(allowed=allowed, level=level, wait_s=wait_s)


async def test_a_spent_minute_refuses_with_its_limit_and_the_wait():
    service = TokenBudgetService(CONFIG, MemoryStore(_bucket(-50, False, 3.5)), clock=lambda: NOW)
    reply = await service.Check(quota_pb2.BudgetCheckRequest(tenant="t1"), None)
    assert not reply.allowed and reply.exhausted == quota_pb2.BUDGET_WINDOW_MINUTE and reply.limit == 1000
    assert reply.retry_after.ToTimedelta().total_seconds() == pytest.approx(3.5)
    assert reply.minute_remaining == 0, "a bucket in debt reads 0, not a negative balance"


async def test_a_spent_month_refuses_until_the_next_month_begins_in_utc():
    service = TokenBudgetService(CONFIG, MemoryStore(_bucket(900, True), month_used=50_000), clock=lambda: NOW)
    reply = await service.Check(quota_pb2.BudgetCheckRequest(tenant="t1"), None)
    assert not reply.allowed and reply.exhausted == quota_pb2.BUDGET_WINDOW_MONTH
    assert reply.retry_after.ToTimedelta() == dt.timedelta(hours=1), "23:00 on Dec 31 -> Jan 1 00:00"
    assert reply.minute_remaining == 900 and reply.month_remaining == 0


async def test_an_unknown_tenant_is_invalid_and_a_store_failure_hides_its_detail():
    service = TokenBudgetService(CONFIG, MemoryStore(_bucket(0, True)), clock=lambda: NOW)
    with pytest.raises(MeshError) as unknown:
        await service.Check(quota_pb2.BudgetCheckRequest(tenant="nobody"), None)
    assert unknown.value.code == grpc.StatusCode.INVALID_ARGUMENT
    broken = TokenBudgetService(CONFIG, MemoryStore(_bucket(0, True), fails=True), clock=lambda: NOW)
    with pytest.raises(MeshError) as down:
        await broken.Check(quota_pb2.BudgetCheckRequest(tenant="t1"), None)
    assert down.value.code == grpc.StatusCode.UNAVAILABLE and "secret" not in down.value.message

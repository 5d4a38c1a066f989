"""Token budgets per tenant: per minute (a bucket that may go into debt) and per calendar month (UTC)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import grpc
from redis.exceptions import RedisError

from inference_mesh.v1 import quota_pb2, quota_pb2_grpc
from services.common.errors import internal_failure, invalid
from services.common.tenants import Tenant, TenantConfig, Tier
from services.ratelimit import metrics
from services.ratelimit.buckets import LimitStore, seconds_to_next_month
from services.ratelimit.envoy_rls import as_duration


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TokenBudgetService(quota_pb2_grpc.TokenBudgetServicer):
    def __init__(self, config: TenantConfig, store: LimitStore, clock: Callable[[], dt.datetime] = utc_now) -> None:
        self._config = config
        self._store = store
        self._clock = clock

    def reload(self, config: TenantConfig) -> None:
        self._config = config

    async def _tenant(self, tenant_id: str, context: grpc.aio.ServicerContext) -> tuple[Tenant, Tier]:
        tenant = self._config.tenant(tenant_id)
        if tenant is None:
            raise invalid(f"unknown tenant {tenant_id!r}")
        return tenant, self._config.tiers[tenant.tier]

    async def Check(self, request: quota_pb2.BudgetCheckRequest, context: grpc.aio.ServicerContext
                    ) -> quota_pb2.BudgetCheckReply:
        tenant, tier = await self._tenant(request.tenant, context)
        started = time.perf_counter()
        reply = quota_pb2.BudgetCheckReply(allowed=True)
        try:
            if tier.tokens_per_minute:
                minute = await self._store.minute_tokens(tenant.id, tier.tokens_per_minute)
                reply.minute_remaining = max(0, int(minute.level))
                if not minute.allowed:
                    reply.allowed = False
                    reply.exhausted = quota_pb2.BUDGET_WINDOW_MINUTE
                    reply.limit = tier.tokens_per_minute
                    reply.retry_after.CopyFrom(as_duration(minute.wait_s))
            if tier.tokens_per_month:
                now = self._clock()
                used = await self._store.month_used(tenant.id, now)
                reply.month_remaining = max(0, tier.tokens_per_month - used)
                if reply.allowed and used >= tier.tokens_per_month:
                    reply.allowed = False
                    reply.exhausted = quota_pb2.BUDGET_WINDOW_MONTH
                    reply.limit = tier.tokens_per_month
                    reply.retry_after.CopyFrom(as_duration(seconds_to_next_month(now)))
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        finally:
            metrics.DECISION_SECONDS.labels("token_budget").observe(time.perf_counter() - started)
        metrics.BUDGET_DECISIONS.labels(tenant.tier, "ok" if reply.allowed else "exhausted").inc()
        return reply

    async def Charge(self, request: quota_pb2.BudgetChargeRequest, context: grpc.aio.ServicerContext
                     ) -> quota_pb2.BudgetChargeReply:
        tenant, tier = await self._tenant(request.tenant, context)
        reply = quota_pb2.BudgetChargeReply()
        if not request.tokens:
            return reply
        try:
            if tier.tokens_per_minute:
                minute = await self._store.minute_tokens(tenant.id, tier.tokens_per_minute, charge=request.tokens)
                reply.minute_remaining = max(0, int(minute.level))
            if tier.tokens_per_month:
                reply.month_used = await self._store.charge_month(tenant.id, request.tokens, self._clock())
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        metrics.TOKENS_CHARGED.labels(tenant.tier).inc(request.tokens)
        return reply

    async def Reserve(self, request: quota_pb2.BudgetReserveRequest, context: grpc.aio.ServicerContext
                      ) -> quota_pb2.BudgetReserveReply:
        tenant, tier = await self._tenant(request.tenant, context)
        if not tier.tokens_per_minute and not tier.tokens_per_month:
            return quota_pb2.BudgetReserveReply(check=quota_pb2.BudgetCheckReply(allowed=True))
        ttl_s = request.ttl.ToTimedelta().total_seconds()
        if request.tokens <= 0 or ttl_s <= 0:
            raise invalid("a reservation needs tokens > 0 and a ttl > 0")
        now = self._clock()
        try:
            held = await self._store.reserve(tenant.id, tier.tokens_per_minute, tier.tokens_per_month,
                                             request.tokens, ttl_s, now)
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        check = quota_pb2.BudgetCheckReply(allowed=held.allowed, minute_remaining=max(0, int(held.minute_level)),
                                           month_remaining=max(0, tier.tokens_per_month - held.month_used))
        if held.refused_window == 1:
            check.exhausted, check.limit = quota_pb2.BUDGET_WINDOW_MINUTE, tier.tokens_per_minute
            check.retry_after.CopyFrom(as_duration(held.wait_s))
        elif held.refused_window == 2:
            check.exhausted, check.limit = quota_pb2.BUDGET_WINDOW_MONTH, tier.tokens_per_month
            check.retry_after.CopyFrom(as_duration(seconds_to_next_month(now)))
        metrics.BUDGET_DECISIONS.labels(tenant.tier, "ok" if held.allowed else "exhausted").inc()
        return quota_pb2.BudgetReserveReply(check=check, reservation=held.reservation)

    async def Settle(self, request: quota_pb2.BudgetSettleRequest, context: grpc.aio.ServicerContext
                     ) -> quota_pb2.BudgetSettleReply:
        tenant, tier = await self._tenant(request.tenant, context)
        if not request.reservation:
            raise invalid("reservation is required: what Reserve returned")
        try:
            settled = await self._store.settle(tenant.id, tier.tokens_per_minute, tier.tokens_per_month,
                                               request.reservation, request.used_tokens, self._clock())
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        metrics.TOKENS_CHARGED.labels(tenant.tier).inc(request.used_tokens)
        return quota_pb2.BudgetSettleReply(settled=settled)

    async def expire_reservations(self) -> int:
        """Gives back everything held by reservations past their ttl (their gateway never settled them)."""
        expired = 0
        tenant_ids = [tenant.id for tenant in self._config.tenants]
        for reservation, tenant_id in await self._store.expired_reservations(tenant_ids):
            tenant = self._config.tenant(tenant_id)
            if tenant is None:
                continue
            tier = self._config.tiers[tenant.tier]
            await self._store.settle(tenant.id, tier.tokens_per_minute, tier.tokens_per_month, reservation, 0,
                                     self._clock(), expiring=True)
            expired += 1
        if expired:
            metrics.RESERVATIONS_EXPIRED.inc(expired)
        return expired

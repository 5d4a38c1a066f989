"""Token budgets per tenant, and per API key where a key has its own: per minute (a bucket that may go into debt)
and per calendar month (UTC)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from redis.exceptions import RedisError

from inference_mesh.v1 import quota_pb2, quota_pb2_grpc
from services.common.errors import internal_failure, invalid
from services.common.tenants import TenantConfig
from services.ratelimit import metrics
from services.ratelimit.buckets import LimitStore, Reservation, seconds_to_next_month
from services.ratelimit.envoy_rls import as_duration


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Subject:
    """One set of token windows a request spends from: its tenant's tier, and its API key's own when it has any
    (services/admin: a key's limits sit under its tier's). Buckets are named by tenant id or "key:<id>" (a tenant
    id cannot hold ':')."""

    bucket: str
    tokens_per_minute: int
    tokens_per_month: int
    tier: str

    @property
    def limited(self) -> bool:
        return bool(self.tokens_per_minute or self.tokens_per_month)


# A reservation over several subjects is their reservations joined (key's first); the gateway keeps it opaque.
_JOIN = "|"


class TokenBudgetService(quota_pb2_grpc.TokenBudgetServicer):
    def __init__(self, config: TenantConfig, store: LimitStore, clock: Callable[[], dt.datetime] = utc_now) -> None:
        self._config = config
        self._store = store
        self._clock = clock

    def reload(self, config: TenantConfig) -> None:
        self._config = config

    def _subjects(self, tenant_id: str, key_id: str = "") -> list[Subject]:
        """The key's windows (when it has its own) before the tenant's."""
        tenant = self._config.tenant(tenant_id)
        if tenant is None:
            raise invalid(f"unknown tenant {tenant_id!r}")
        tier = self._config.tiers[tenant.tier]
        subjects = [Subject(tenant.id, tier.tokens_per_minute, tier.tokens_per_month, tenant.tier)]
        # A key this replica has not polled yet (made within the last poll interval) has only its tenant's.
        key = self._config.key(key_id) if key_id else None
        if key is not None:
            if key[0].id != tenant.id:
                raise invalid(f"key {key_id[:40]!r} is not one of tenant {tenant_id!r}'s")
            own = Subject(f"key:{key_id}", key[1].tokens_per_minute, key[1].tokens_per_month, tenant.tier)
            if own.limited:
                subjects.insert(0, own)
        return subjects

    async def Check(self, request: quota_pb2.BudgetCheckRequest, context: grpc.aio.ServicerContext
                    ) -> quota_pb2.BudgetCheckReply:
        subjects = self._subjects(request.tenant, request.key_id)
        started = time.perf_counter()
        reply = quota_pb2.BudgetCheckReply(allowed=True)
        try:
            # The tenant's remaining figures are reported; the first window that is spent refuses.
            for subject in reversed(subjects):
                if subject.tokens_per_minute:
                    minute = await self._store.minute_tokens(subject.bucket, subject.tokens_per_minute)
                    reply.minute_remaining = max(0, int(minute.level)) if subject is subjects[-1] \
                        else min(reply.minute_remaining, max(0, int(minute.level)))
                    if not minute.allowed and reply.allowed:
                        reply.allowed = False
                        reply.exhausted = quota_pb2.BUDGET_WINDOW_MINUTE
                        reply.limit = subject.tokens_per_minute
                        reply.retry_after.CopyFrom(as_duration(minute.wait_s))
                if subject.tokens_per_month:
                    now = self._clock()
                    used = await self._store.month_used(subject.bucket, now)
                    left = max(0, subject.tokens_per_month - used)
                    reply.month_remaining = left if subject is subjects[-1] else min(reply.month_remaining, left)
                    if reply.allowed and used >= subject.tokens_per_month:
                        reply.allowed = False
                        reply.exhausted = quota_pb2.BUDGET_WINDOW_MONTH
                        reply.limit = subject.tokens_per_month
                        reply.retry_after.CopyFrom(as_duration(seconds_to_next_month(now)))
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        finally:
            metrics.DECISION_SECONDS.labels("token_budget").observe(time.perf_counter() - started)
        metrics.BUDGET_DECISIONS.labels(subjects[-1].tier, "ok" if reply.allowed else "exhausted").inc()
        return reply

    async def Charge(self, request: quota_pb2.BudgetChargeRequest, context: grpc.aio.ServicerContext
                     ) -> quota_pb2.BudgetChargeReply:
        subjects = self._subjects(request.tenant, request.key_id)
        reply = quota_pb2.BudgetChargeReply()
        if not request.tokens:
            return reply
        try:
            for subject in subjects:
                if subject.tokens_per_minute:
                    minute = await self._store.minute_tokens(subject.bucket, subject.tokens_per_minute,
                                                             charge=request.tokens)
                    reply.minute_remaining = max(0, int(minute.level))
                if subject.tokens_per_month:
                    reply.month_used = await self._store.charge_month(subject.bucket, request.tokens, self._clock())
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        metrics.TOKENS_CHARGED.labels(subjects[-1].tier).inc(request.tokens)
        return reply

    async def Reserve(self, request: quota_pb2.BudgetReserveRequest, context: grpc.aio.ServicerContext
                      ) -> quota_pb2.BudgetReserveReply:
        subjects = [s for s in self._subjects(request.tenant, request.key_id) if s.limited]
        if not subjects:
            return quota_pb2.BudgetReserveReply(check=quota_pb2.BudgetCheckReply(allowed=True))
        ttl_s = request.ttl.ToTimedelta().total_seconds()
        if request.tokens <= 0 or ttl_s <= 0:
            raise invalid("a reservation needs tokens > 0 and a ttl > 0")
        now = self._clock()
        held: list[tuple[Subject, Reservation]] = []
        try:
            for subject in subjects:
                got = await self._store.reserve(subject.bucket, subject.tokens_per_minute, subject.tokens_per_month,
                                                request.tokens, ttl_s, now)
                held.append((subject, got))
                if not got.allowed:
                    # What the others already hold goes back: a refused request spends nothing.
                    for other, reservation in held[:-1]:
                        await self._store.settle(other.bucket, other.tokens_per_minute, other.tokens_per_month,
                                                 reservation.reservation, 0, now, expiring=True)
                    break
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        subject, last = held[-1]
        check = quota_pb2.BudgetCheckReply(allowed=last.allowed, minute_remaining=max(0, int(last.minute_level)),
                                           month_remaining=max(0, subject.tokens_per_month - last.month_used))
        if last.refused_window == 1:
            check.exhausted, check.limit = quota_pb2.BUDGET_WINDOW_MINUTE, subject.tokens_per_minute
            check.retry_after.CopyFrom(as_duration(last.wait_s))
        elif last.refused_window == 2:
            check.exhausted, check.limit = quota_pb2.BUDGET_WINDOW_MONTH, subject.tokens_per_month
            check.retry_after.CopyFrom(as_duration(seconds_to_next_month(now)))
        metrics.BUDGET_DECISIONS.labels(subject.tier, "ok" if last.allowed else "exhausted").inc()
        joined = _JOIN.join(reservation.reservation for _, reservation in held) if last.allowed else ""
        return quota_pb2.BudgetReserveReply(check=check, reservation=joined)

    async def Settle(self, request: quota_pb2.BudgetSettleRequest, context: grpc.aio.ServicerContext
                     ) -> quota_pb2.BudgetSettleReply:
        subjects = [s for s in self._subjects(request.tenant, request.key_id) if s.limited]
        if not request.reservation:
            raise invalid("reservation is required: what Reserve returned")
        reservations = request.reservation.split(_JOIN)
        if len(reservations) != len(subjects):
            # The key's limits changed while the generation ran: settle the tenant's part, which is always last.
            subjects, reservations = subjects[-1:], reservations[-1:]
        settled = True
        try:
            for subject, reservation in zip(subjects, reservations, strict=True):
                settled &= await self._store.settle(subject.bucket, subject.tokens_per_minute,
                                                    subject.tokens_per_month, reservation, request.used_tokens,
                                                    self._clock())
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("token_budget").inc()
            raise internal_failure("token-budget store (Redis) unavailable", exc) from exc
        metrics.TOKENS_CHARGED.labels(subjects[-1].tier).inc(request.used_tokens)
        return quota_pb2.BudgetSettleReply(settled=settled)

    async def expire_reservations(self) -> int:
        """Gives back everything held by reservations past their ttl (their gateway never settled them)."""
        expired = 0
        limits = {tenant.id: self._config.tiers[tenant.tier] for tenant in self._config.tenants}
        limits |= {f"key:{key.id}": key for tenant in self._config.tenants for key in tenant.keys
                   if key.tokens_per_minute or key.tokens_per_month}
        for reservation, bucket in await self._store.expired_reservations(list(limits)):
            limit = limits.get(bucket)
            if limit is None:
                continue
            await self._store.settle(bucket, limit.tokens_per_minute, limit.tokens_per_month, reservation, 0,
                                     self._clock(), expiring=True)
            expired += 1
        if expired:
            metrics.RESERVATIONS_EXPIRED.inc(expired)
        return expired

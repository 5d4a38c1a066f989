"""Envoy's global rate-limit protocol (envoy.service.ratelimit.v3) on the shared Redis buckets."""

from __future__ import annotations

import math
import time

import grpc
from google.protobuf.duration_pb2 import Duration
from redis.exceptions import RedisError

from inference_mesh.edge import envoy_ratelimit_pb2 as rls
from inference_mesh.edge import envoy_ratelimit_pb2_grpc
from services.common.errors import internal_failure, invalid
from services.common.tenants import TenantConfig
from services.ratelimit import metrics
from services.ratelimit.buckets import BucketState
from services.ratelimit.leases import LeasedRequests
from services.ratelimit.tenants import TenantResolver

Status = rls.RateLimitResponse.DescriptorStatus
OK, OVER_LIMIT = rls.RateLimitResponse.OK, rls.RateLimitResponse.OVER_LIMIT


def as_duration(seconds: float) -> Duration:
    whole = int(seconds)
    return Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


# The names OpenAI's API gives its request limits (Envoy adds its own x-ratelimit-limit/-remaining/-reset too):
# OpenAI clients and dashboards read these.
OPENAI_LIMIT = "x-ratelimit-limit-requests"


def _openai_headers(per_minute: int, level: float, until_reset_s: float) -> list[rls.HeaderValue]:
    return [rls.HeaderValue(key=OPENAI_LIMIT, value=str(per_minute)),
            rls.HeaderValue(key="x-ratelimit-remaining-requests", value=str(max(0, int(level)))),
            rls.HeaderValue(key="x-ratelimit-reset-requests", value=f"{max(0.0, until_reset_s):.3f}s")]


class EnvoyRateLimitService(envoy_ratelimit_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, config: TenantConfig, requests: LeasedRequests, domain: str) -> None:
        self.reload(config)
        self._requests = requests
        self._domain = domain

    def reload(self, config: TenantConfig) -> None:
        """Decide from `config` from now on (the admin directory's poll). Tiers are never deleted, so a tenant
        the old resolver found still has its tier in the new table."""
        self._config = config
        self._resolver = TenantResolver(config)

    @staticmethod
    def _refuse(reply: rls.RateLimitResponse, state: BucketState, why: str) -> None:
        """The first refusal of a request names its limit and when to retry."""
        if reply.overall_code == OVER_LIMIT:
            return
        reply.overall_code = OVER_LIMIT
        retry_after = max(1, math.ceil(state.wait_s))
        reply.response_headers_to_add.append(rls.HeaderValue(key="retry-after", value=str(retry_after)))
        reply.raw_body = f"rate limit: {why}; retry after {retry_after} s".encode()

    async def ShouldRateLimit(self, request: rls.RateLimitRequest, context: grpc.aio.ServicerContext
                              ) -> rls.RateLimitResponse:
        if request.domain != self._domain:
            raise invalid(f"unknown rate-limit domain {request.domain!r}; this service serves {self._domain!r}")
        started = time.perf_counter()
        reply = rls.RateLimitResponse(overall_code=OK)
        # A request may carry a JWT and an API key for the same tenant: count it once.
        decided: dict[str, BucketState] = {}
        try:
            for descriptor in request.descriptors:
                tenant, api_key = self._resolver.resolve_key((e.key, e.value) for e in descriptor.entries)
                if tenant is None:
                    metrics.UNRESOLVED.inc()
                    reply.statuses.append(Status(code=OK))
                    continue
                tier = self._config.tiers[tenant.tier]
                hits = max(1, descriptor.hits_addend.value if descriptor.HasField("hits_addend")
                           else request.hits_addend)
                if api_key is not None and api_key.requests_per_minute:
                    # The key's own bucket first: a request its key may not make spends nothing of its tenant's.
                    # Bucket names are tenant ids or "key:<id>"; a tenant id cannot hold ':'.
                    bucket = f"key:{api_key.id}"
                    key_state = decided.get(bucket)
                    if key_state is None:
                        key_state = await self._requests.take(bucket, api_key.requests_per_minute, api_key.burst,
                                                              hits)
                        decided[bucket] = key_state
                    if not key_state.allowed:
                        metrics.REQUEST_DECISIONS.labels(tenant.tier, "key_over_limit").inc()
                        self._refuse(reply, key_state, f"API key {api_key.id} is over its own "
                                     f"{api_key.requests_per_minute} requests/min with a burst of {api_key.burst}")
                        reply.statuses.append(Status(code=OVER_LIMIT))
                        continue
                state = decided.get(tenant.id)
                if state is None:
                    state = await self._requests.take(tenant.id, tier.requests_per_minute, tier.burst, hits)
                    decided[tenant.id] = state
                    metrics.REQUEST_DECISIONS.labels(tenant.tier, "ok" if state.allowed else "over_limit").inc()
                rate = tier.requests_per_minute / 60.0
                until_reset = state.wait_s if not state.allowed else (tier.burst - state.level) / rate
                if not any(h.key == OPENAI_LIMIT for h in reply.response_headers_to_add):
                    reply.response_headers_to_add.extend(_openai_headers(tier.requests_per_minute, state.level,
                                                                         until_reset))
                reply.statuses.append(Status(
                    code=OK if state.allowed else OVER_LIMIT,
                    current_limit=rls.RateLimitResponse.RateLimit(
                        name=tenant.tier, requests_per_unit=tier.requests_per_minute,
                        unit=rls.RateLimitResponse.RateLimit.MINUTE),
                    limit_remaining=max(0, int(state.level)),
                    duration_until_reset=as_duration(max(0.0, until_reset))))
                if not state.allowed:
                    self._refuse(reply, state, f"tenant {tenant.id!r} ({tenant.tier} tier) is over "
                                 f"{tier.requests_per_minute} requests/min with a burst of {tier.burst}")
        except RedisError as exc:
            metrics.REDIS_ERRORS.labels("envoy_rls").inc()
            raise internal_failure("rate-limit store (Redis) unavailable", exc) from exc
        finally:
            metrics.DECISION_SECONDS.labels("envoy_rls").observe(time.perf_counter() - started)
        return reply

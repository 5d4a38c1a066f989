"""Rate-limit process: Envoy's RateLimitService and the mesh's TokenBudget on grpc.aio, one Redis."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from inference_mesh.edge import envoy_ratelimit_pb2, envoy_ratelimit_pb2_grpc
from inference_mesh.v1 import quota_pb2, quota_pb2_grpc
from services.admin.directory import TenantDirectory
from services.common.server import ServiceHost, run_service
from services.ratelimit.buckets import LimitStore
from services.ratelimit.envoy_rls import EnvoyRateLimitService
from services.ratelimit.leases import LeasedRequests, LeaseSettings
from services.ratelimit.settings import RateLimitSettings
from services.ratelimit.token_budget import TokenBudgetService

log = logging.getLogger(__name__)


async def serve(settings: RateLimitSettings) -> None:
    directory = await asyncio.to_thread(TenantDirectory.open, settings.admin, settings.tenants_file)
    config = directory.config
    store = LimitStore(settings.redis_url, settings.key_prefix, settings.redis_timeout_s)
    host = ServiceHost("ratelimit", settings)
    requests = LeasedRequests(store, LeaseSettings(settings.lease_burst_fraction, settings.lease_max_size,
                                                   settings.lease_ttl_s))
    decisions = EnvoyRateLimitService(config, requests, settings.domain)
    envoy_ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server(decisions, host.server)
    budgets = TokenBudgetService(config, store)
    directory.subscribe(decisions.reload)
    directory.subscribe(budgets.reload)
    quota_pb2_grpc.add_TokenBudgetServicer_to_server(budgets, host.server)
    host.expose([envoy_ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
                 quota_pb2.DESCRIPTOR.services_by_name["TokenBudget"].full_name])

    async def redis_answers() -> bool:
        return bool(await store.redis.ping())

    async def sweep() -> None:
        while True:
            await asyncio.sleep(settings.lease_ttl_s / 2)
            try:
                await requests.give_back_expired()
                await budgets.expire_reservations()
            except RedisError as exc:  # tried again at the next sweep (leases: lost; the bucket refills them)
                log.warning("expired leases or reservations not given back", extra={"error": str(exc)})

    try:
        await host.run(background=[host.serving_while(redis_answers), sweep, directory.follow])
    finally:
        await store.close()
        directory.close()


def main() -> None:
    run_service("ratelimit", RateLimitSettings, serve)

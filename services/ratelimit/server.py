"""Rate-limit process: Envoy's RateLimitService and the mesh's TokenBudget on grpc.aio, one Redis."""

from __future__ import annotations

from inference_mesh.edge import envoy_ratelimit_pb2, envoy_ratelimit_pb2_grpc
from inference_mesh.v1 import quota_pb2, quota_pb2_grpc
from services.common.server import ServiceHost, run_service
from services.common.tenants import TenantConfig
from services.ratelimit.buckets import LimitStore
from services.ratelimit.envoy_rls import EnvoyRateLimitService
from services.ratelimit.settings import RateLimitSettings
from services.ratelimit.token_budget import TokenBudgetService


async def serve(settings: RateLimitSettings) -> None:
    config = TenantConfig.load(settings.tenants_file)
    store = LimitStore(settings.redis_url, settings.key_prefix, settings.redis_timeout_s)
    host = ServiceHost("ratelimit", settings)
    envoy_ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server(
        EnvoyRateLimitService(config, store, settings.domain), host.server)
    quota_pb2_grpc.add_TokenBudgetServicer_to_server(TokenBudgetService(config, store), host.server)
    host.expose([envoy_ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
                 quota_pb2.DESCRIPTOR.services_by_name["TokenBudget"].full_name])

    async def redis_answers() -> bool:
        return bool(await store.redis.ping())

    try:
        await host.run(background=[host.serving_while(redis_answers)])
    finally:
        await store.close()


def main() -> None:
    run_service("ratelimit", RateLimitSettings, serve)

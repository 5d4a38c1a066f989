from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RateLimitSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_RATELIMIT_", extra="forbid")

    port: int = 50055
    metrics_port: int = 9105
    redis_url: str = "redis://127.0.0.1:6379/1"
    # Tenants and tiers: the same file the gateway reads.
    tenants_file: str = "config/tenants.yaml"
    # The domain Envoy's ratelimit filter sends; requests for another domain are refused as misconfigured.
    domain: str = "inference-mesh"
    key_prefix: str = "mesh:limits"
    # Envoy waits at most its own rate-limit timeout; answering later than that is wasted work.
    redis_timeout_s: float = 0.1

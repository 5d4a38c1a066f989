from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.admin.settings import AdminDatabase
from services.common.settings import ServiceSettings


class RateLimitSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_RATELIMIT_", extra="forbid")

    port: int = 50055
    metrics_port: int = 9105
    redis_url: str = "redis://127.0.0.1:6379/1"
    # Tenants and tiers: the admin database the gateways read (services/admin), seeded from this file when empty.
    tenants_file: str = "config/tenants.yaml"
    admin: AdminDatabase = AdminDatabase()
    # The domain Envoy's ratelimit filter sends; requests for another domain are refused as misconfigured.
    domain: str = "inference-mesh"
    key_prefix: str = "mesh:limits"
    # Envoy waits at most its own rate-limit timeout; answering later than that is wasted work.
    redis_timeout_s: float = 0.1
    # Request limits decided from a quota leased per replica (services/ratelimit/leases.py: no overshoot, at most
    # one lease per replica held unspent): a lease is this share of the tier's burst, at most lease_max_size
    # tokens, given back after lease_ttl_s. 0: one Redis call per request.
    lease_burst_fraction: float = Field(0.1, ge=0.0, le=1.0)
    lease_max_size: int = Field(100, ge=0)
    lease_ttl_s: float = Field(1.0, gt=0.0)

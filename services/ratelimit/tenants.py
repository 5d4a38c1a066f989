"""Which tenant a rate-limit descriptor speaks for."""

from __future__ import annotations

from collections.abc import Iterable

from services.common.tenants import Tenant, TenantConfig, hash_key

# Descriptor keys the rendered Envoy config sends (services/edge/render.py): a tenant claim Envoy verified in a
# JWT, or the API key as the client sent it (the gateway checks it again; here it only selects the bucket).
TENANT_CLAIM = "tenant"
API_KEY = "api_key"
AUTHORIZATION = "authorization"


class TenantResolver:
    def __init__(self, config: TenantConfig) -> None:
        self._by_id = {t.id: t for t in config.tenants}
        self._by_key_hash = config.tenant_by_key_hash()

    def resolve(self, entries: Iterable[tuple[str, str]]) -> Tenant | None:
        for key, value in entries:
            if key == TENANT_CLAIM:
                return self._by_id.get(value)
            if key == API_KEY:
                return self._by_key_hash.get(hash_key(value.strip()))
            if key == AUTHORIZATION and value[:7].lower() == "bearer ":
                return self._by_key_hash.get(hash_key(value[7:].strip()))
        return None

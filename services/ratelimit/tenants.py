"""Which tenant a rate-limit descriptor speaks for."""

from __future__ import annotations

from collections.abc import Iterable

from services.common.tenants import ApiKey, Tenant, TenantConfig, hash_key
from services.common.wire import DESCRIPTOR_API_KEY, DESCRIPTOR_AUTHORIZATION, DESCRIPTOR_TENANT


class TenantResolver:
    def __init__(self, config: TenantConfig) -> None:
        self._by_id = {t.id: t for t in config.tenants}
        self._by_key_hash = {key.sha256: (t, key) for t in config.tenants for key in t.all_keys()}

    def resolve(self, entries: Iterable[tuple[str, str]]) -> Tenant | None:
        return self.resolve_key(entries)[0]

    def resolve_key(self, entries: Iterable[tuple[str, str]]) -> tuple[Tenant | None, ApiKey | None]:
        """A tenant claim Envoy verified in a JWT, or the API key as the client sent it and its tenant (the
        gateway checks it again; here it only selects the buckets)."""
        for key, value in entries:
            if key == DESCRIPTOR_TENANT:
                return self._by_id.get(value), None
            if key == DESCRIPTOR_API_KEY:
                return self._by_key_hash.get(hash_key(value.strip()), (None, None))
            if key == DESCRIPTOR_AUTHORIZATION and value[:7].lower() == "bearer ":
                return self._by_key_hash.get(hash_key(value[7:].strip()), (None, None))
        return None, None

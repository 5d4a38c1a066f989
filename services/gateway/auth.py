"""Who is calling: an API key (`authorization: Bearer <key>` or `x-api-key: <key>`) or, behind Envoy, the tenant
claim of a JWT that Envoy's jwt_authn filter verified."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import grpc

from services.common.errors import unauthenticated
from services.common.tenants import TenantConfig, hash_key
from services.common.wire import EDGE_SECRET_HEADER, JWT_TENANT_HEADER
from services.gateway.credentials import CredentialError, single_credential


@dataclass(frozen=True)
class Caller:
    tenant: str
    tier: str
    share_weight: float = 1.0
    max_stored_vectors: int = 0


class Authenticator:
    def __init__(self, config: TenantConfig, edge_secret: str = "") -> None:
        callers = {t.id: Caller(t.id, t.tier, config.tiers[t.tier].share_weight,
                                config.tiers[t.tier].max_stored_vectors) for t in config.tenants}
        self._by_hash = {digest: callers[t.id] for t in config.tenants for digest in t.api_key_sha256}
        self._by_id = callers
        self._edge_secret = edge_secret

    def _from_edge(self, headers: dict[str, str]) -> tuple[Caller | None, str]:
        claimed = headers.get(JWT_TENANT_HEADER, "")
        secret = headers.get(EDGE_SECRET_HEADER, "")
        if not claimed or not self._edge_secret or not hmac.compare_digest(secret, self._edge_secret):
            return None, ""
        caller = self._by_id.get(claimed)
        return caller, "" if caller else f"the JWT's tenant claim {claimed!r} names no configured tenant"

    def identify(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> tuple[Caller | None, str]:
        """The caller, or None and why not."""
        headers = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        caller, problem = self._from_edge(headers)
        if caller or problem:
            # Envoy verified the JWT and refused any second credential before it set the tenant header.
            return caller, problem
        try:
            credential = single_credential(metadata)
        except CredentialError as exc:
            return None, str(exc)
        caller = self._by_hash.get(hash_key(credential.token))
        return caller, "" if caller else "invalid API key"

    def tenant_of(self, metadata) -> str | None:
        """The tenant a call's credentials name, or None (the call is then refused by require)."""
        caller, _ = self.identify(metadata)
        return caller.tenant if caller else None

    async def require(self, context: grpc.aio.ServicerContext) -> Caller:
        caller, problem = self.identify(context.invocation_metadata())
        if caller is None:
            raise unauthenticated(problem)
        return caller

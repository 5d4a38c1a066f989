"""API-key authentication: `authorization: Bearer <key>` or `x-api-key: <key>` → tenant."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services.gateway.tenants import TenantConfig, hash_key


@dataclass(frozen=True)
class Caller:
    tenant: str
    tier: str


class Authenticator:
    def __init__(self, config: TenantConfig) -> None:
        self._by_hash = {digest: Caller(t.id, t.tier) for t in config.tenants for digest in t.api_key_sha256}

    def identify(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Caller | None:
        headers = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        key = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        if not key and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        return self._by_hash.get(hash_key(key)) if key else None

    async def require(self, context: grpc.aio.ServicerContext) -> Caller:
        caller = self.identify(context.invocation_metadata())
        if caller is None:
            has_key = any(k.lower() in ("x-api-key", "authorization") for k, _ in context.invocation_metadata() or ())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid API key" if has_key
                else "missing API key: send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'",
            )
        return caller

"""Who is calling: an API key (`authorization: Bearer <key>` or `x-api-key: <key>`) or, behind Envoy, the tenant
claim of a JWT that Envoy's jwt_authn filter verified. One identity per call: `Authenticates` (a server
interceptor) decides it once for every RPC of the public services and handlers read it with `current_caller()`;
the load shedder's lookup of the same call's tenant is remembered, so a key is hashed once per call."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import grpc

from inference_mesh.v1 import mesh_pb2
from services.common.errors import bug, denied, unauthenticated
from services.common.handler_wrapping import HandlerInterceptor, Stream, Unary
from services.common.tenants import TenantConfig, Tier, hash_key
from services.common.wire import EDGE_SECRET_HEADER, JWT_TENANT_HEADER
from services.gateway.credentials import CredentialError, single_credential


@dataclass(frozen=True)
class Caller:
    tenant: str
    tier: str
    share_weight: float = 1.0
    max_stored_vectors: int = 0
    key_id: str = ""                              # the API key's id in the admin database; "" for a JWT
    allowed_models: frozenset[str] = frozenset()  # the key's; empty: every model
    # The tier's batch terms (services/common/tenants.Tier); limits 0: the deployment's.
    batch_discount: float = 0.0
    max_batch_files: int = 0
    max_batches_in_flight: int = 0

    def discount_at(self, priority: int) -> float:
        """The share of the price this caller is not charged for work at `priority`."""
        return self.batch_discount if priority == mesh_pb2.PRIORITY_BATCH else 0.0

    def may_use(self, model: str) -> None:
        if self.allowed_models and model not in self.allowed_models:
            raise denied(f"this API key may not use model {model!r}; it may use: "
                         f"{', '.join(sorted(self.allowed_models))}")


def _caller(tenant: str, tier_name: str, tier: Tier) -> Caller:
    return Caller(tenant, tier_name, tier.share_weight, tier.max_stored_vectors, batch_discount=tier.batch_discount,
                  max_batch_files=tier.max_batch_files, max_batches_in_flight=tier.max_batches_in_flight)


@dataclass(frozen=True)
class _KeyGrant:
    caller: Caller
    expires_at: float | None


# The call's identity, set by Authenticates before its handler runs (each grpc.aio call runs in its own task).
_CALLER: ContextVar[Caller | None] = ContextVar("mesh_caller", default=None)
# The last identification in this task, with the metadata it was made from: the shedder asks first, then the
# interceptor, for the same call.
_IDENTIFIED: ContextVar[tuple[Any, Any, Caller | None, str] | None] = ContextVar("mesh_identified", default=None)


def current_caller() -> Caller:
    """The caller of the RPC being handled; only handlers behind Authenticates may ask."""
    caller = _CALLER.get()
    if caller is None:
        raise bug("no caller: this handler is not behind the Authenticates interceptor")
    return caller


class Authenticator:
    def __init__(self, config: TenantConfig, edge_secret: str = "", clock=time.time) -> None:
        self._edge_secret = edge_secret
        self._clock = clock
        self.reload(config)

    def reload(self, config: TenantConfig) -> None:
        """Serve from `config` from now on (the admin directory's poll calls it with each change). The tables
        are built whole and swapped in one assignment each: a call identified meanwhile sees the old or the new."""
        callers = {t.id: _caller(t.id, t.tier, config.tiers[t.tier]) for t in config.tenants}
        grants = {}
        for tenant in config.tenants:
            for key in tenant.all_keys():
                caller = replace(callers[tenant.id], key_id=key.id, allowed_models=frozenset(key.allowed_models))
                grants[key.sha256] = _KeyGrant(caller, key.expires_at)
        self._suspended = frozenset(t.id for t in config.tenants if t.suspended)
        self._by_hash = grants
        self._by_id = callers
        self._by_key_id = {grant.caller.key_id: grant for grant in grants.values() if grant.caller.key_id}

    def _from_edge(self, headers: dict[str, str]) -> tuple[Caller | None, str]:
        claimed = headers.get(JWT_TENANT_HEADER, "")
        secret = headers.get(EDGE_SECRET_HEADER, "")
        if not claimed or not self._edge_secret or not hmac.compare_digest(secret, self._edge_secret):
            return None, ""
        caller = self._by_id.get(claimed)
        if caller is None:
            return None, f"the JWT's tenant claim {claimed!r} names no configured tenant"
        if claimed in self._suspended:
            return None, f"tenant {claimed!r} is suspended"
        return caller, ""

    def identify(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> tuple[Caller | None, str]:
        """The caller, or None and why not."""
        remembered = _IDENTIFIED.get()
        # Same metadata and the same tables (a reload in between decides afresh).
        if remembered is not None and remembered[0] == metadata and remembered[1] is self._by_hash:
            return remembered[2], remembered[3]
        tables = self._by_hash
        caller, problem = self._identify(metadata)
        _IDENTIFIED.set((metadata, tables, caller, problem))
        return caller, problem

    def _identify(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> tuple[Caller | None, str]:
        headers = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        caller, problem = self._from_edge(headers)
        if caller or problem:
            # Envoy verified the JWT and refused any second credential before it set the tenant header.
            return caller, problem
        try:
            credential = single_credential(metadata)
        except CredentialError as exc:
            return None, str(exc)
        grant = self._by_hash.get(hash_key(credential.token))
        if grant is None:
            return None, "invalid API key"
        if grant.expires_at is not None and self._clock() >= grant.expires_at:
            return None, f"this API key expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(grant.expires_at))}"
        if grant.caller.tenant in self._suspended:
            return None, f"tenant {grant.caller.tenant!r} is suspended"
        return grant.caller, ""

    def caller_for(self, tenant: str, key_id: str) -> tuple[Caller | None, str]:
        """The caller that work queued earlier runs as (a batch's lines): the key that queued it, as it stands
        now (revoked, expired or suspended: none), or the tenant itself for work a JWT queued (no key id)."""
        if tenant in self._suspended:
            return None, f"tenant {tenant!r} is suspended"
        if not key_id:
            caller = self._by_id.get(tenant)
            return (caller, "") if caller else (None, f"tenant {tenant!r} no longer exists")
        grant = self._by_key_id.get(key_id)
        if grant is None or grant.caller.tenant != tenant:
            return None, f"the API key that created this batch ({key_id}) was revoked"
        if grant.expires_at is not None and self._clock() >= grant.expires_at:
            return None, f"the API key that created this batch ({key_id}) expired"
        return grant.caller, ""

    def tenant_of(self, metadata) -> str | None:
        """The tenant a call's credentials name, or None (the call is then refused by require)."""
        caller, _ = self.identify(metadata)
        return caller.tenant if caller else None

    def require(self, metadata) -> Caller:
        caller, problem = self.identify(metadata)
        if caller is None:
            raise unauthenticated(problem)
        return caller


class Authenticates(HandlerInterceptor):
    """Every RPC of the named services is refused UNAUTHENTICATED unless its credentials name a caller, who is
    then `current_caller()` for its handler. Runs inside the error interceptor, so a refusal is a MeshError."""

    def __init__(self, auth: Authenticator, services: tuple[str, ...]) -> None:
        super().__init__()
        self._auth = auth
        self._prefixes = tuple(f"/{service}/" for service in services)

    def around_unary(self, inner: Unary, method: str) -> Unary:
        if not method.startswith(self._prefixes):
            return inner

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _CALLER.set(self._auth.require(context.invocation_metadata()))
            return await inner(request, context)
        return unary

    def around_stream(self, inner: Stream, method: str) -> Stream:
        if not method.startswith(self._prefixes):
            return inner

        # Not a generator of its own: every streamed chunk would pass one more `async for ... yield` frame. The
        # caller is set in the call's task before the handler's generator starts; a refusal raised here is
        # still inside the error interceptor's try, which iterates what this returns.
        def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            _CALLER.set(self._auth.require(context.invocation_metadata()))
            return inner(request, context)
        return stream

"""The admin API (inference_mesh.v1.Admin): every call admitted by the gate, checked and written by the store
(in a thread: the event loop keeps serving inference meanwhile), and logged with who made it. The HTTP routes
(services/gateway/admin_http.py) call the same AdminOps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from inference_mesh.v1 import admin_pb2, admin_pb2_grpc, router_pb2
from services.admin.gate import AdminGate
from services.admin.store import AdminStore
from services.admin.usage_reports import UsageQuery, report
from services.common.errors import failed_precondition
from services.common.internal_tls import peer_identity

log = logging.getLogger(__name__)


class _NoDatabase:
    """The store of a replica without an admin database: every call says how to get one."""

    def __getattr__(self, name: str):
        def refuse(*args, **kwargs):
            raise failed_precondition("this deployment has no admin database, so tenants and keys come from its "
                                      "tenants file: set MESH_GATEWAY_ADMIN__URL (and MESH_RATELIMIT_ADMIN__URL) to "
                                      "a PostgreSQL or SQLite URL to manage them here")
        return refuse


Replicas = Callable[[], Awaitable[router_pb2.ListReplicasResponse]]


class AdminOps:
    def __init__(self, store: AdminStore | None, gate: AdminGate, replicas: Replicas | None = None) -> None:
        self._store = store if store is not None else _NoDatabase()
        self._gate = gate
        self._replicas = replicas

    def admit(self, headers: Iterable[tuple[str, Any]], peer: str | None) -> str:
        return self._gate.admit(headers, peer)

    async def _run(self, admin: str, action: str, call, *args, **kwargs):
        result = await asyncio.to_thread(call, *args, **kwargs)
        log.info("admin change" if action.startswith(("put", "create", "update", "rotate", "revoke"))
                 else "admin read", extra={"admin": admin, "action": action})
        return result

    async def list_tiers(self, admin: str) -> admin_pb2.ListTiersResponse:
        return admin_pb2.ListTiersResponse(tiers=await self._run(admin, "list_tiers", self._store.list_tiers))

    async def put_tier(self, admin: str, tier: admin_pb2.AdminTier) -> admin_pb2.AdminTier:
        return await self._run(admin, "put_tier", self._store.put_tier, tier)

    async def create_tenant(self, admin: str, request: admin_pb2.CreateTenantRequest) -> admin_pb2.AdminTenant:
        return await self._run(admin, "create_tenant", self._store.create_tenant, request.id, request.tier)

    async def list_tenants(self, admin: str) -> admin_pb2.ListTenantsResponse:
        return admin_pb2.ListTenantsResponse(tenants=await self._run(admin, "list_tenants", self._store.list_tenants))

    async def update_tenant(self, admin: str, request: admin_pb2.UpdateTenantRequest) -> admin_pb2.AdminTenant:
        return await self._run(admin, "update_tenant", self._store.update_tenant, request.id,
                               request.tier if request.HasField("tier") else None,
                               request.suspended if request.HasField("suspended") else None)

    async def create_key(self, admin: str, request: admin_pb2.CreateKeyRequest) -> admin_pb2.CreatedKey:
        key, secret = await self._run(admin, "create_key", self._store.create_key, request.tenant,
                                      request.expires_at, list(request.allowed_models), dict(request.labels),
                                      request.requests_per_minute, request.burst, request.tokens_per_minute,
                                      request.tokens_per_month)
        return admin_pb2.CreatedKey(key=key, secret=secret)

    async def list_keys(self, admin: str, request: admin_pb2.ListKeysRequest) -> admin_pb2.ListKeysResponse:
        return admin_pb2.ListKeysResponse(keys=await self._run(admin, "list_keys", self._store.list_keys,
                                                                request.tenant, request.prefix,
                                                                request.include_revoked))

    async def rotate_key(self, admin: str, request: admin_pb2.RotateKeyRequest) -> admin_pb2.CreatedKey:
        key, secret = await self._run(admin, "rotate_key", self._store.rotate_key, request.id, request.overlap_s)
        return admin_pb2.CreatedKey(key=key, secret=secret)

    async def revoke_key(self, admin: str, request: admin_pb2.RevokeKeyRequest) -> admin_pb2.AdminKey:
        return await self._run(admin, "revoke_key", self._store.revoke_key, request.id)

    async def list_replicas(self, admin: str) -> router_pb2.ListReplicasResponse:
        if self._replicas is None:
            raise failed_precondition("this server has no router to ask for replicas")
        return await self._replicas()

    async def usage(self, admin: str, query: UsageQuery) -> dict:
        """An OpenAI-shaped usage or costs page (services/admin/usage_reports.py)."""
        query.checked()
        return await self._run(admin, f"usage_{query.report}", lambda: report(self._store.engine, query))


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, ops: AdminOps) -> None:
        self._ops = ops

    def _admin(self, context: grpc.aio.ServicerContext) -> str:
        return self._ops.admit(context.invocation_metadata() or (), peer_identity(context))

    async def ListTiers(self, request, context):
        return await self._ops.list_tiers(self._admin(context))

    async def PutTier(self, request, context):
        return await self._ops.put_tier(self._admin(context), request)

    async def CreateTenant(self, request, context):
        return await self._ops.create_tenant(self._admin(context), request)

    async def ListTenants(self, request, context):
        return await self._ops.list_tenants(self._admin(context))

    async def UpdateTenant(self, request, context):
        return await self._ops.update_tenant(self._admin(context), request)

    async def CreateKey(self, request, context):
        return await self._ops.create_key(self._admin(context), request)

    async def ListKeys(self, request, context):
        return await self._ops.list_keys(self._admin(context), request)

    async def RotateKey(self, request, context):
        return await self._ops.rotate_key(self._admin(context), request)

    async def RevokeKey(self, request, context):
        return await self._ops.revoke_key(self._admin(context), request)

    async def ListReplicas(self, request, context):
        return await self._ops.list_replicas(self._admin(context))

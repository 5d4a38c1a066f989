"""The admin API as JSON over HTTP under /admin/v1/ (the same calls as inference_mesh.v1.Admin, the same
AdminOps behind them), on the gateway's HTTP port: the edge routes /admin/v1/ here. Bodies and answers are the
proto messages' JSON (field names as in admin.proto); errors are the gateway's usual OpenAI-shaped ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

import services.admin
from inference_mesh.v1 import admin_pb2
from services.admin.service import AdminOps
from services.admin.usage_reports import UsageQuery
from services.common.errors import invalid, not_found
from services.common.internal_tls import peer_identity_of_certificate

PREFIX = "/admin/v1"
CONSOLE = Path(services.admin.__file__).parent / "console"
_CONSOLE_FILES = {"console.js": "text/javascript", "console.css": "text/css"}
# The console's data is people's input (tenant names, labels): its script puts it in as text, and the page runs
# no script but its own.
_CONSOLE_HEADERS = {"content-security-policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                               "form-action 'self'",
                    "x-content-type-options": "nosniff", "cache-control": "no-store", "referrer-policy": "no-referrer"}


def _answer(message: Message, status: int = 200) -> web.Response:
    body = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return web.json_response(body, status=status)


async def _body(request: web.Request, message: Message, **from_path: Any) -> Message:
    raw = await request.read()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise invalid(f"the body is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise invalid("the body must be a JSON object")
    for name, value in from_path.items():
        if name in parsed and parsed[name] != value:
            raise invalid(f"{name!r} in the body ({str(parsed[name])[:80]!r}) differs from the path's ({value!r})")
        parsed[name] = value
    try:
        return json_format.ParseDict(parsed, message)
    except json_format.ParseError as exc:
        raise invalid(f"the body does not fit {message.DESCRIPTOR.name}: {exc}") from None


class AdminHttp:
    def __init__(self, ops: AdminOps) -> None:
        self._ops = ops

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(f"{PREFIX}/tiers", self.list_tiers)
        app.router.add_put(f"{PREFIX}/tiers/{{name}}", self.put_tier)
        app.router.add_get(f"{PREFIX}/tenants", self.list_tenants)
        app.router.add_post(f"{PREFIX}/tenants", self.create_tenant)
        app.router.add_patch(f"{PREFIX}/tenants/{{tenant}}", self.update_tenant)
        app.router.add_get(f"{PREFIX}/keys", self.list_keys)
        app.router.add_post(f"{PREFIX}/tenants/{{tenant}}/keys", self.create_key)
        app.router.add_post(f"{PREFIX}/keys/{{key}}/rotate", self.rotate_key)
        app.router.add_post(f"{PREFIX}/keys/{{key}}/revoke", self.revoke_key)
        app.router.add_get(f"{PREFIX}/replicas", self.list_replicas)
        app.router.add_get("/admin/console", self.console)
        app.router.add_get("/admin/console/{name}", self.console_file)
        # OpenAI's organization reports, at OpenAI's paths (an admin credential, as OpenAI's admin keys).
        app.router.add_get("/v1/organization/usage/{report}", self.usage)
        app.router.add_get("/v1/organization/costs", self.usage)

    def _admin(self, request: web.Request) -> str:
        certificate = request.transport.get_extra_info("peercert") if request.transport else None
        return self._ops.admit(tuple(request.headers.items()), peer_identity_of_certificate(certificate))

    async def list_tiers(self, request: web.Request) -> web.Response:
        return _answer(await self._ops.list_tiers(self._admin(request)))

    async def put_tier(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        tier = await _body(request, admin_pb2.AdminTier(), name=request.match_info["name"])
        return _answer(await self._ops.put_tier(admin, tier))

    async def list_tenants(self, request: web.Request) -> web.Response:
        return _answer(await self._ops.list_tenants(self._admin(request)))

    async def create_tenant(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        return _answer(await self._ops.create_tenant(admin, await _body(request, admin_pb2.CreateTenantRequest())),
                       status=201)

    async def update_tenant(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        update = await _body(request, admin_pb2.UpdateTenantRequest(), id=request.match_info["tenant"])
        return _answer(await self._ops.update_tenant(admin, update))

    async def list_keys(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        query = request.query
        unknown = set(query) - {"tenant", "prefix", "include_revoked"}
        if unknown:
            raise invalid(f"unknown query parameters: {', '.join(sorted(unknown))[:200]}")
        include = query.get("include_revoked", "false").lower()
        if include not in ("true", "false"):
            raise invalid("include_revoked must be true or false")
        return _answer(await self._ops.list_keys(admin, admin_pb2.ListKeysRequest(
            tenant=query.get("tenant", ""), prefix=query.get("prefix", ""), include_revoked=include == "true")))

    async def create_key(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        ask = await _body(request, admin_pb2.CreateKeyRequest(), tenant=request.match_info["tenant"])
        return _answer(await self._ops.create_key(admin, ask), status=201)

    async def rotate_key(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        ask = await _body(request, admin_pb2.RotateKeyRequest(), id=request.match_info["key"])
        return _answer(await self._ops.rotate_key(admin, ask), status=201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        return _answer(await self._ops.revoke_key(admin, admin_pb2.RevokeKeyRequest(id=request.match_info["key"])))

    async def list_replicas(self, request: web.Request) -> web.Response:
        return _answer(await self._ops.list_replicas(self._admin(request)))

    async def console(self, request: web.Request) -> web.Response:
        """The page itself holds nothing secret: every figure is fetched with the admin's token."""
        return web.Response(body=(CONSOLE / "index.html").read_bytes(), content_type="text/html",
                            headers=_CONSOLE_HEADERS)

    async def console_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _CONSOLE_FILES:
            raise not_found(f"no console file {name[:80]!r}")
        return web.Response(body=(CONSOLE / name).read_bytes(), content_type=_CONSOLE_FILES[name],
                            headers=_CONSOLE_HEADERS)

    async def usage(self, request: web.Request) -> web.Response:
        admin = self._admin(request)
        return web.json_response(await self._ops.usage(admin, usage_query(
            request.match_info.get("report", "costs"), request.query)))


_QUERY_LISTS = ("group_by", "project_ids", "api_key_ids", "models")
_QUERY_VALUES = ("start_time", "end_time", "bucket_width", "limit", "page")


def usage_query(report: str, query) -> UsageQuery:
    """OpenAI's query string: lists repeated (group_by=model&group_by=project_id) or with [] as its SDKs send."""
    names = {name.removesuffix("[]") for name in query}
    unknown = names - set(_QUERY_LISTS) - set(_QUERY_VALUES)
    if unknown:
        raise invalid(f"unknown query parameters: {', '.join(sorted(unknown))[:200]}")
    lists = {name: (*query.getall(name, ()), *query.getall(name + "[]", ())) for name in _QUERY_LISTS}
    if "start_time" not in query:
        raise invalid("start_time is required (unix seconds)")
    try:
        numbers = {name: int(query[name]) for name in ("start_time", "end_time", "limit") if name in query}
    except ValueError:
        raise invalid("start_time, end_time and limit are whole numbers") from None
    return UsageQuery(report=report, bucket_width=query.get("bucket_width", "1d"), page=query.get("page", ""),
                      **numbers, **lists)

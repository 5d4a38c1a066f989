"""OpenAI's Files and Batches routes (/v1/files, /v1/batches) on the gateway's HTTP API: the form and the query
string read here, the rest in api.py (the same as the gRPC Batches service), its refusals in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from services.common.errors import MeshError
from services.gateway.auth import Caller
from services.gateway.batches.api import BatchApi, invalid, metadata_of
from services.gateway.openai_http.app import parsed_body
from services.gateway.openai_http.errors import REQUEST_TOO_LARGE, HttpError, OpenAIError, from_mesh_error
from services.gateway.openai_http.schema import CreateBatchRequest

# Where OpenAI answers otherwise than the mesh's usual mapping (services/gateway/openai_http/errors.py).
_BATCH_HTTP = {grpc.StatusCode.NOT_FOUND: HttpError(404, "invalid_request_error", "not_found"),
               grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", "limit_exceeded"),
               grpc.StatusCode.FAILED_PRECONDITION: HttpError(409, "invalid_request_error", "batch_not_cancellable")}
Handler = Callable[[web.Request], Awaitable[web.Response]]


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": int(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def _at(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_object(row: dict) -> dict:
    return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": None,
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
            "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
            **{name: _at(row[name]) for name in ("created_at", "in_progress_at", "expires_at", "finalizing_at",
                                                 "completed_at", "failed_at", "expired_at", "cancelling_at",
                                                 "cancelled_at")},
            "request_counts": row["counts"], "metadata": metadata_of(row["metadata"]) or None}


def _in_openai_shape(handler: Handler) -> Handler:
    async def answered(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except MeshError as exc:
            error = from_mesh_error(exc)
            raise OpenAIError(_BATCH_HTTP.get(exc.code, error.kind), exc.message, getattr(exc, "param", None),
                              error.headers) from None
    return answered


class BatchesHttp:
    def __init__(self, api: BatchApi) -> None:
        self._api = api
        self._caller: Callable[[web.Request], Caller] = _unset

    def add_routes(self, app: web.Application, caller: Callable[[web.Request], Caller]) -> None:
        self._caller = caller
        for method, path, handler in (
                ("POST", "/v1/files", self.upload), ("GET", "/v1/files", self.list_files),
                ("GET", "/v1/files/{file_id}", self.get_file), ("GET", "/v1/files/{file_id}/content", self.content),
                ("DELETE", "/v1/files/{file_id}", self.delete_file), ("POST", "/v1/batches", self.create_batch),
                ("GET", "/v1/batches", self.list_batches), ("GET", "/v1/batches/{batch_id}", self.get_batch),
                ("POST", "/v1/batches/{batch_id}/cancel", self.cancel_batch)):
            app.router.add_route(method, path, _in_openai_shape(handler))

    # --- files -----------------------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if not request.content_type.startswith("multipart/"):
            raise invalid("upload a file as multipart/form-data with the fields \"file\" and \"purpose\"")
        try:
            purpose, filename, data = await self._form(request)
        except (ValueError, BadHttpMessage) as exc:  # no boundary, a truncated body, a malformed part header
            raise invalid(f"the multipart/form-data body cannot be read ({str(exc)[:200]}); send the fields "
                          "\"file\" and \"purpose\" as a form, as the openai SDK does") from None
        if purpose == "batch" and not filename:
            raise invalid("no \"file\" field in the form", "file")
        return web.json_response(file_object(await self._api.upload(caller, purpose, filename, data)))

    async def _form(self, request: web.Request) -> tuple[str | None, str, bytes]:
        purpose, filename, data = None, "", b""
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name == "purpose":
                purpose = (await part.read(decode=True)).decode(errors="replace")[:64]
            elif part.name == "file":
                filename = (part.filename or "upload.jsonl")[:256]
                data = await self._read_limited(part)
        return purpose, filename, data

    async def _read_limited(self, part) -> bytes:
        limit = self._api.settings.max_file_bytes
        chunks, size = [], 0
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise OpenAIError(REQUEST_TOO_LARGE, f"the file is over this deployment's {limit} bytes per file",
                                  "file")
            chunks.append(chunk)
        return b"".join(chunks)

    async def get_file(self, request: web.Request) -> web.Response:
        return web.json_response(file_object(await self._api.file(self._caller(request),
                                                                  request.match_info["file_id"])))

    async def content(self, request: web.Request) -> web.Response:
        data = await self._api.content(self._caller(request), request.match_info["file_id"])
        return web.Response(body=data, content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        row = await self._api.delete_file(self._caller(request), request.match_info["file_id"])
        return web.json_response({"id": row["id"], "object": "file", "deleted": True})

    async def list_files(self, request: web.Request) -> web.Response:
        limit, after = _page(request, {"purpose"})
        rows, more = await self._api.files(self._caller(request), request.query.get("purpose") or None, limit, after)
        return web.json_response(_list([file_object(r) for r in rows], more))

    # --- batches ---------------------------------------------------------------------------------------
    async def create_batch(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if request.content_type != "application/json":
            raise invalid(f"send the body as application/json, not {request.content_type or 'nothing'}")
        body: CreateBatchRequest = parsed_body(CreateBatchRequest, await request.read())
        return web.json_response(batch_object(await self._api.create_batch(
            caller, body.endpoint, body.input_file_id, body.completion_window, body.metadata or {})))

    async def get_batch(self, request: web.Request) -> web.Response:
        return web.json_response(batch_object(await self._api.batch(self._caller(request),
                                                                    request.match_info["batch_id"])))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        return web.json_response(batch_object(await self._api.cancel(self._caller(request),
                                                                     request.match_info["batch_id"])))

    async def list_batches(self, request: web.Request) -> web.Response:
        limit, after = _page(request, set())
        rows, more = await self._api.batches(self._caller(request), limit, after)
        return web.json_response(_list([batch_object(r) for r in rows], more))


def _unset(request: web.Request) -> Caller:
    raise RuntimeError("BatchesHttp.add_routes was not called")


class NoBatches:
    """The routes of a deployment without a database for batches: each says how to get one."""

    def add_routes(self, app: web.Application, caller: Callable[[web.Request], Caller]) -> None:
        async def refuse(request: web.Request) -> web.Response:
            caller(request)
            raise OpenAIError(HttpError(400, "invalid_request_error", "failed_precondition"), NO_BATCHES)
        for path in ("/v1/files", "/v1/files/{rest:.*}", "/v1/batches", "/v1/batches/{rest:.*}"):
            app.router.add_route("*", path, refuse)


NO_BATCHES = ("this deployment keeps no files or batches: they need the mesh's database (MESH_GATEWAY_ADMIN__URL) "
              "and MESH_GATEWAY_BATCH__ENABLED")


def _page(request: web.Request, other: set[str]) -> tuple[int, str | None]:
    unknown = sorted(set(request.query) - {"limit", "after"} - other)
    if unknown:
        raise invalid(f"unknown query parameters: {', '.join(unknown)[:200]}")
    raw = request.query.get("limit", "20")
    if not raw.isdigit():
        raise invalid("limit must be a whole number from 1 to 100", "limit")
    return int(raw), request.query.get("after") or None


def _list(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}

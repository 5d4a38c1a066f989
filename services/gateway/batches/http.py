"""OpenAI's Files and Batches routes (/v1/files, /v1/batches) on the gateway's HTTP API. Every id is looked up
with the caller's tenant: another tenant's file or batch is "not found", the same answer as one that never was.
A request that is refused leaves nothing behind: a file is checked whole before its bytes are kept, a batch's
lines and models before its row is written."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from inference_mesh.v1 import models_pb2
from services.common.errors import MeshError
from services.gateway.auth import Caller
from services.gateway.batches import jsonl
from services.gateway.batches.settings import BatchSettings
from services.gateway.batches.storage import FileStorage, StorageUnavailable
from services.gateway.batches.store import BatchStore, Refused, new_id
from services.gateway.core import MeshCore
from services.gateway.openai_http.app import parsed_body
from services.gateway.openai_http.errors import (
    REQUEST_TOO_LARGE,
    HttpError,
    OpenAIError,
    from_mesh_error,
    invalid_body,
)
from services.gateway.openai_http.schema import CreateBatchRequest

NOT_FOUND = HttpError(404, "invalid_request_error", "not_found")
STORAGE_AWAY = HttpError(503, "server_error", "service_unavailable")
LIMIT = HttpError(429, "rate_limit_error", "limit_exceeded")
log = logging.getLogger(__name__)
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
_KIND = {"/v1/embeddings": models_pb2.MODEL_KIND_EMBED, "/v1/chat/completions": models_pb2.MODEL_KIND_GENERATE,
         "/v1/completions": models_pb2.MODEL_KIND_GENERATE}


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
            "request_counts": row["counts"], "metadata": _metadata(row["metadata"])}


def _metadata(raw: str) -> dict[str, str] | None:
    return json.loads(raw) or None


def window_seconds(window: str, settings: BatchSettings) -> float:
    if window == "24h":
        return 86400.0
    match = _WINDOW.match(window)
    if not match:
        raise invalid_body(f"completion_window {window[:40]!r} is not a duration like \"24h\"", "completion_window")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if not settings.min_window_s <= seconds <= settings.max_window_s:
        raise invalid_body(f"completion_window must be \"24h\" or between {settings.min_window_s:g} s and "
                           f"{settings.max_window_s:g} s", "completion_window")
    return float(seconds)


class BatchesHttp:
    def __init__(self, store: BatchStore, files: FileStorage, settings: BatchSettings, core: MeshCore) -> None:
        self._store = store
        self._files = files
        self._settings = settings
        self._core = core
        self._caller: Callable[[web.Request], Caller] = _unset

    def add_routes(self, app: web.Application, caller: Callable[[web.Request], Caller]) -> None:
        self._caller = caller
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files", self.list_files)
        app.router.add_get("/v1/files/{file_id}", self.get_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_delete("/v1/files/{file_id}", self.delete_file)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)

    # --- files -----------------------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if not request.content_type.startswith("multipart/"):
            raise invalid_body("upload a file as multipart/form-data with the fields \"file\" and \"purpose\"")
        try:
            purpose, filename, data = await self._form(request)
        except (ValueError, BadHttpMessage) as exc:  # no boundary, a truncated body, a malformed part header
            raise invalid_body(f"the multipart/form-data body cannot be read ({str(exc)[:200]}); send the "
                               "fields \"file\" and \"purpose\" as a form, as the openai SDK does") from None
        if purpose != "batch":
            raise invalid_body(f"purpose {purpose!r}: this mesh keeps files for batches only (purpose \"batch\")",
                               "purpose")
        if not filename:
            raise invalid_body("no \"file\" field in the form", "file")
        try:
            lines = jsonl.parse(data, self._settings.max_line_bytes, self._settings.max_lines)
        except jsonl.BadFile as exc:
            raise invalid_body(str(exc), "file") from None
        file_id = new_id("file")
        try:
            await asyncio.to_thread(self._files.put, file_id, data)
        except StorageUnavailable as exc:
            raise _storage_away(exc) from None
        try:
            row = await asyncio.to_thread(self._store.add_file, file_id, caller.tenant, "batch", filename, len(data),
                                          len(lines), self._settings.max_files)
        except BaseException as exc:
            await asyncio.to_thread(self._files.delete, file_id)
            if isinstance(exc, Refused):
                raise OpenAIError(LIMIT, str(exc)) from None
            raise
        return web.json_response(file_object(row))

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
        limit = self._settings.max_file_bytes
        chunks, size = [], 0
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise OpenAIError(REQUEST_TOO_LARGE, f"the file is over this deployment's {limit} bytes per file",
                                  "file")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _file(self, request: web.Request) -> dict:
        caller = self._caller(request)
        file_id = request.match_info["file_id"]
        row = await asyncio.to_thread(self._store.file, caller.tenant, file_id)
        if row is None:
            raise OpenAIError(NOT_FOUND, f"No such File object: {file_id[:60]}", "file_id")
        return row

    async def _bytes(self, file_id: str) -> bytes:
        try:
            return await asyncio.to_thread(self._files.get, file_id)
        except StorageUnavailable as exc:
            raise _storage_away(exc) from None
        except FileNotFoundError:
            # The row says it was kept, this replica cannot see it: it does not share the storage of the replica
            # that took the upload.
            raise OpenAIError(STORAGE_AWAY,
                              f"file {file_id} is not in this gateway's file storage: every gateway replica must "
                              "share one MESH_GATEWAY_BATCH__FILES_DIR or S3 bucket") from None

    async def get_file(self, request: web.Request) -> web.Response:
        return web.json_response(file_object(await self._file(request)))

    async def file_content(self, request: web.Request) -> web.Response:
        row = await self._file(request)
        return web.Response(body=await self._bytes(row["id"]), content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        row = await self._file(request)
        if await asyncio.to_thread(self._store.delete_file, caller.tenant, row["id"]):
            try:
                await asyncio.to_thread(self._files.delete, row["id"])
            except StorageUnavailable as exc:
                # The file is gone for every caller (its row is); only its bytes stay behind, unreachable.
                log.warning("a deleted file's bytes stay in storage", extra={"file_id": row["id"], "error": str(exc)})
        return web.json_response({"id": row["id"], "object": "file", "deleted": True})

    async def list_files(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        limit, after = _page(request, {"purpose"})
        purpose = request.query.get("purpose") or None
        rows, more = await self._listed(self._store.files, caller.tenant, purpose, limit, after)
        return web.json_response(_list([file_object(r) for r in rows], more))

    # --- batches ---------------------------------------------------------------------------------------
    async def create_batch(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if request.content_type != "application/json":
            raise invalid_body(f"send the body as application/json, not {request.content_type or 'nothing'}")
        body: CreateBatchRequest = parsed_body(CreateBatchRequest, await request.read())
        if body.endpoint not in jsonl.ENDPOINTS:
            raise invalid_body(f"endpoint {body.endpoint[:80]!r} is not one a batch can call: "
                               f"{', '.join(jsonl.ENDPOINTS)}", "endpoint")
        window_s = window_seconds(body.completion_window, self._settings)
        for key, value in (body.metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise invalid_body("metadata keys are at most 64 characters, values at most 512", "metadata")
        row = await asyncio.to_thread(self._store.file, caller.tenant, body.input_file_id)
        if row is None or row["purpose"] != "batch":
            raise OpenAIError(NOT_FOUND, f"No such File object: {body.input_file_id[:60]} (a file uploaded with "
                                         "purpose \"batch\")", "input_file_id")
        data = await self._bytes(row["id"])
        try:
            lines = jsonl.parse(data, self._settings.max_line_bytes, self._settings.max_lines)
        except jsonl.BadFile as exc:  # limits lowered since the upload
            raise invalid_body(str(exc), "input_file_id") from None
        await self._check_lines(caller, body.endpoint, lines)
        try:
            batch = await asyncio.to_thread(
                self._store.create_batch, caller.tenant, caller.key_id, body.endpoint, row["id"],
                body.completion_window, window_s, body.metadata or {}, lines, self._settings.max_batches_in_flight)
        except Refused as exc:
            raise OpenAIError(LIMIT, str(exc)) from None
        return web.json_response(batch_object(batch))

    async def _check_lines(self, caller: Caller, endpoint: str, lines: list[jsonl.InputLine]) -> None:
        """Every line for this endpoint, every model one the caller may use with it: refused now, whole, rather
        than a batch that can only fail."""
        first_of: dict[str, int] = {}
        for line in lines:
            if line.url != endpoint:
                raise invalid_body(f"line {line.number} calls {line.url}, but this batch's endpoint is {endpoint}: "
                                   "a batch calls one endpoint", "input_file_id")
            first_of.setdefault(line.model, line.number)
        for model, number in first_of.items():
            try:
                await self._core.model(caller, model, _KIND[endpoint])
            except MeshError as exc:
                error = from_mesh_error(exc)
                raise OpenAIError(error.kind, f"line {number}: {error.message}", "input_file_id") from None

    async def _batch(self, request: web.Request) -> tuple[Caller, dict]:
        caller = self._caller(request)
        batch_id = request.match_info["batch_id"]
        row = await asyncio.to_thread(self._store.batch, caller.tenant, batch_id)
        if row is None:
            raise OpenAIError(NOT_FOUND, f"No such Batch object: {batch_id[:60]}", "batch_id")
        return caller, row

    async def get_batch(self, request: web.Request) -> web.Response:
        return web.json_response(batch_object((await self._batch(request))[1]))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        caller, row = await self._batch(request)
        if row["status"] not in ("validating", "in_progress", "cancelling"):
            raise OpenAIError(HttpError(409, "invalid_request_error", "batch_not_cancellable"),
                              f"batch {row['id']} is {row['status']}: only a batch in progress can be cancelled")
        cancelled = await asyncio.to_thread(self._store.cancel, caller.tenant, row["id"])
        return web.json_response(batch_object(cancelled or row))

    async def list_batches(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        limit, after = _page(request, set())
        rows, more = await self._listed(self._store.batches, caller.tenant, limit, after)
        return web.json_response(_list([batch_object(r) for r in rows], more))

    @staticmethod
    async def _listed(call, *args):
        try:
            return await asyncio.to_thread(call, *args)
        except Refused as exc:
            raise invalid_body(str(exc), "after") from None


def _storage_away(exc: StorageUnavailable) -> OpenAIError:
    log.warning("batch file storage did not answer", extra={"error": str(exc)})
    return OpenAIError(STORAGE_AWAY, "the mesh's file storage did not answer; nothing was kept or changed, try "
                                     "again in a moment")


def _unset(request: web.Request) -> Caller:
    raise RuntimeError("BatchesHttp.add_routes was not called")


class NoBatches:
    """The routes of a deployment without a database for batches: each says how to get one."""

    def add_routes(self, app: web.Application, caller: Callable[[web.Request], Caller]) -> None:
        async def refuse(request: web.Request) -> web.Response:
            caller(request)
            raise OpenAIError(HttpError(400, "invalid_request_error", "failed_precondition"),
                              "this deployment keeps no files or batches: they need the mesh's database "
                              "(MESH_GATEWAY_ADMIN__URL) and MESH_GATEWAY_BATCH__ENABLED")
        for path in ("/v1/files", "/v1/files/{rest:.*}", "/v1/batches", "/v1/batches/{rest:.*}"):
            app.router.add_route("*", path, refuse)


def _page(request: web.Request, other: set[str]) -> tuple[int, str | None]:
    unknown = sorted(set(request.query) - {"limit", "after"} - other)
    if unknown:
        raise invalid_body(f"unknown query parameters: {', '.join(unknown)[:200]}")
    raw = request.query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise invalid_body("limit must be a whole number from 1 to 100", "limit")
    return int(raw), request.query.get("after") or None


def _list(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}

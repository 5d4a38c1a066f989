"""The Files and Batches API whatever carries it (HTTP in http.py, gRPC in grpc_service.py): every id is looked up
with the caller's tenant, so another tenant's file or batch is "not found", the same answer as one that never was.
A request that is refused leaves nothing behind: a file is checked whole before its bytes are kept, a batch's lines
and models before its row is written. Refusals are MeshErrors; `param` names the field at fault."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import grpc

from inference_mesh.v1 import models_pb2
from services.common.errors import MeshError
from services.gateway.auth import Caller
from services.gateway.batches import jsonl
from services.gateway.batches.settings import BatchSettings
from services.gateway.batches.storage import FileStorage, StorageUnavailable
from services.gateway.batches.store import BatchStore, Refused, new_id
from services.gateway.core import MeshCore

log = logging.getLogger(__name__)
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
_KIND = {"/v1/embeddings": models_pb2.MODEL_KIND_EMBED, "/v1/chat/completions": models_pb2.MODEL_KIND_GENERATE,
         "/v1/completions": models_pb2.MODEL_KIND_GENERATE}
CANCELLABLE = ("validating", "in_progress", "cancelling")


class BatchError(MeshError):
    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None) -> None:
        super().__init__(code, message)
        self.param = param


def invalid(message: str, param: str | None = None) -> BatchError:
    return BatchError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


def _not_found(kind: str, given: str, param: str, hint: str = "") -> BatchError:
    return BatchError(grpc.StatusCode.NOT_FOUND, f"No such {kind} object: {given[:60]}{hint}", param)


def _over_limit(exc: Refused) -> BatchError:
    return BatchError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


def too_large(limit: int) -> BatchError:
    return invalid(f"the file is over this deployment's {limit} bytes per file", "file")


def storage_away(exc: StorageUnavailable) -> BatchError:
    log.warning("batch file storage did not answer", extra={"error": str(exc)})
    return BatchError(grpc.StatusCode.UNAVAILABLE, "the mesh's file storage did not answer; nothing was kept or "
                                                   "changed, try again in a moment")


def window_seconds(window: str, settings: BatchSettings) -> float:
    if window == "24h":
        return 86400.0
    match = _WINDOW.match(window)
    if not match:
        raise invalid(f"completion_window {window[:40]!r} is not a duration like \"24h\"", "completion_window")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if not settings.min_window_s <= seconds <= settings.max_window_s:
        raise invalid(f"completion_window must be \"24h\" or between {settings.min_window_s:g} s and "
                      f"{settings.max_window_s:g} s", "completion_window")
    return float(seconds)


def page_limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise invalid("limit must be a whole number from 1 to 100", "limit")
    return limit


class BatchApi:
    def __init__(self, store: BatchStore, files: FileStorage, settings: BatchSettings, core: MeshCore) -> None:
        self._store = store
        self._files = files
        self.settings = settings
        self._core = core

    # --- files -----------------------------------------------------------------------------------------
    async def upload(self, caller: Caller, purpose: str | None, filename: str, data: bytes) -> dict:
        if purpose != "batch":
            raise invalid(f"purpose {purpose!r}: this mesh keeps files for batches only (purpose \"batch\")",
                          "purpose")
        if not filename:
            raise invalid("no file was sent", "file")
        if len(data) > self.settings.max_file_bytes:
            raise too_large(self.settings.max_file_bytes)
        try:
            lines = jsonl.parse(data, self.settings.max_line_bytes, self.settings.max_lines)
        except jsonl.BadFile as exc:
            raise invalid(str(exc), "file") from None
        file_id = new_id("file")
        try:
            await asyncio.to_thread(self._files.put, file_id, data)
        except StorageUnavailable as exc:
            raise storage_away(exc) from None
        try:
            return await asyncio.to_thread(self._store.add_file, file_id, caller.tenant, "batch", filename[:256],
                                           len(data), len(lines), caller.max_batch_files or self.settings.max_files)
        except BaseException as exc:
            await self._discard_bytes(file_id)
            if isinstance(exc, Refused):
                raise _over_limit(exc) from None
            raise

    async def file(self, caller: Caller, file_id: str) -> dict:
        return await self._owned(self._store.file, "File", caller, file_id, "file_id")

    @staticmethod
    async def _owned(lookup, kind: str, caller: Caller, given: str, param: str) -> dict:
        """The caller's tenant's row, or NOT_FOUND: the answer for another tenant's id and for one never made."""
        row = await asyncio.to_thread(lookup, caller.tenant, given)
        if row is None:
            raise _not_found(kind, given, param)
        return row

    async def content(self, caller: Caller, file_id: str) -> bytes:
        return await self._bytes((await self.file(caller, file_id))["id"])

    async def _bytes(self, file_id: str) -> bytes:
        try:
            return await asyncio.to_thread(self._files.get, file_id)
        except StorageUnavailable as exc:
            raise storage_away(exc) from None
        except FileNotFoundError:
            # The row says it was kept, this replica cannot see it: it does not share the storage of the replica
            # that took the upload.
            raise BatchError(grpc.StatusCode.UNAVAILABLE,
                             f"file {file_id} is not in this gateway's file storage: every gateway replica must "
                             "share one MESH_GATEWAY_BATCH__FILES_DIR or S3 bucket") from None

    async def delete_file(self, caller: Caller, file_id: str) -> dict:
        row = await self.file(caller, file_id)
        if await asyncio.to_thread(self._store.delete_file, caller.tenant, row["id"]):
            await self._discard_bytes(row["id"])
        return row

    async def _discard_bytes(self, file_id: str) -> None:
        """Deletes the bytes of a file no caller can reach (its row is gone or was never kept). Storage that does
        not answer only leaves them behind, unreachable: the caller is told what happened to the file, not that
        the clean-up failed (an upload over the tenant's limit stays a 429, not a 503)."""
        try:
            await asyncio.to_thread(self._files.delete, file_id)
        except StorageUnavailable as exc:
            log.warning("an unreachable file's bytes stay in storage", extra={"file_id": file_id, "error": str(exc)})

    async def files(self, caller: Caller, purpose: str | None, limit: int,
                    after: str | None) -> tuple[list[dict], bool]:
        return await self._listed(self._store.files, caller.tenant, purpose, page_limit(limit), after)

    # --- batches ---------------------------------------------------------------------------------------
    async def create_batch(self, caller: Caller, endpoint: str, input_file_id: str, completion_window: str,
                           metadata: dict[str, str]) -> dict:
        if endpoint not in jsonl.ENDPOINTS:
            raise invalid(f"endpoint {endpoint[:80]!r} is not one a batch can call: {', '.join(jsonl.ENDPOINTS)}",
                          "endpoint")
        window_s = window_seconds(completion_window, self.settings)
        if len(metadata) > 16 or any(len(key) > 64 or len(value) > 512 for key, value in metadata.items()):
            raise invalid("metadata is at most 16 pairs, keys at most 64 characters, values at most 512",
                          "metadata")
        row = await asyncio.to_thread(self._store.file, caller.tenant, input_file_id)
        if row is None or row["purpose"] != "batch":
            raise _not_found("File", input_file_id, "input_file_id", " (a file uploaded with purpose \"batch\")")
        data = await self._bytes(row["id"])
        try:
            lines = jsonl.parse(data, self.settings.max_line_bytes, self.settings.max_lines)
        except jsonl.BadFile as exc:  # limits lowered since the upload
            raise invalid(str(exc), "input_file_id") from None
        await self._check_lines(caller, endpoint, lines)
        try:
            return await asyncio.to_thread(
                self._store.create_batch, caller.tenant, caller.key_id, endpoint, row["id"], completion_window,
                window_s, metadata, lines, caller.max_batches_in_flight or self.settings.max_batches_in_flight)
        except Refused as exc:
            raise _over_limit(exc) from None

    async def _check_lines(self, caller: Caller, endpoint: str, lines: list[jsonl.InputLine]) -> None:
        """Every line for this endpoint, every model one the caller may use with it: refused now, whole, rather
        than a batch that can only fail."""
        first_of: dict[str, int] = {}
        for line in lines:
            if line.url != endpoint:
                raise invalid(f"line {line.number} calls {line.url}, but this batch's endpoint is {endpoint}: a "
                              "batch calls one endpoint", "input_file_id")
            first_of.setdefault(line.model, line.number)
        for model, number in first_of.items():
            try:
                await self._core.model(caller, model, _KIND[endpoint])
            except MeshError as exc:
                raise BatchError(exc.code, f"line {number}: {exc.message}", "input_file_id") from None

    async def batch(self, caller: Caller, batch_id: str) -> dict:
        return await self._owned(self._store.batch, "Batch", caller, batch_id, "batch_id")

    async def cancel(self, caller: Caller, batch_id: str) -> dict:
        row = await self.batch(caller, batch_id)
        if row["status"] not in CANCELLABLE:
            raise BatchError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"batch {row['id']} is {row['status']}: only a batch in progress can be cancelled")
        return await asyncio.to_thread(self._store.cancel, caller.tenant, row["id"]) or row

    async def batches(self, caller: Caller, limit: int, after: str | None) -> tuple[list[dict], bool]:
        return await self._listed(self._store.batches, caller.tenant, page_limit(limit), after)

    @staticmethod
    async def _listed(call, *args):
        try:
            return await asyncio.to_thread(call, *args)
        except Refused as exc:
            raise invalid(str(exc), "after") from None


def metadata_of(raw: str) -> dict[str, str]:
    return json.loads(raw) or {}

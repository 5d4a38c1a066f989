"""The Batches service (protos/inference_mesh/v1/batches.proto): api.py's Files and Batches API over gRPC, for
the caller the interceptor authenticated. Files stream both ways in chunks, so no message nears gRPC's limits."""

from __future__ import annotations

from collections.abc import AsyncIterator

from inference_mesh.v1 import batches_pb2, batches_pb2_grpc
from services.common.errors import failed_precondition
from services.gateway.auth import current_caller
from services.gateway.batches.api import BatchApi, invalid, metadata_of, too_large

CHUNK_BYTES = 1024 * 1024
_TIMES = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")


def file_message(row: dict) -> batches_pb2.File:
    return batches_pb2.File(id=row["id"], bytes=row["bytes"], created_at=int(row["created_at"]),
                            filename=row["filename"], purpose=row["purpose"])


def batch_message(row: dict) -> batches_pb2.Batch:
    counts = row["counts"]
    return batches_pb2.Batch(
        id=row["id"], endpoint=row["endpoint"], input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=batches_pb2.BatchStatus.Value(f"BATCH_STATUS_{row['status'].upper()}"),
        output_file_id=row["output_file_id"] or "", error_file_id=row["error_file_id"] or "",
        request_counts=batches_pb2.RequestCounts(total=counts["total"], completed=counts["completed"],
                                                 failed=counts["failed"]),
        metadata=metadata_of(row["metadata"]), created_at=int(row["created_at"]),
        **{name: int(row[name]) for name in _TIMES if row[name] is not None})


class BatchesService(batches_pb2_grpc.BatchesServicer):
    """api None: a deployment that keeps no batches; every RPC answers FAILED_PRECONDITION with `why`."""

    def __init__(self, api: BatchApi | None, why: str = "") -> None:
        self._batches = api
        self._why = why

    @property
    def _api(self) -> BatchApi:
        if self._batches is None:
            raise failed_precondition(self._why)
        return self._batches

    async def UploadFile(self, request_iterator: AsyncIterator[batches_pb2.UploadFileRequest], context):
        caller = current_caller()
        limit = self._api.settings.max_file_bytes
        header: batches_pb2.FileHeader | None = None
        chunks: list[bytes] = []
        size = 0
        async for message in request_iterator:
            part = message.WhichOneof("part")
            if header is None:
                if part != "header":
                    raise invalid("the first UploadFileRequest is the header (filename, purpose)", "header")
                header = message.header
            elif part == "chunk":
                if len(message.chunk) > CHUNK_BYTES:
                    raise invalid(f"a chunk is at most {CHUNK_BYTES} bytes", "chunk")
                size += len(message.chunk)
                if size > limit:  # before the rest arrives: the stream is not read to its end
                    raise too_large(limit)
                chunks.append(message.chunk)
            else:
                raise invalid("only the first UploadFileRequest is a header", "header")
        if header is None:
            raise invalid("no UploadFileRequest was sent: a header, then the file's bytes", "header")
        return file_message(await self._api.upload(caller, header.purpose, header.filename or "upload.jsonl",
                                                   b"".join(chunks)))

    async def GetFile(self, request: batches_pb2.FileRef, context):
        return file_message(await self._api.file(current_caller(), request.file_id))

    async def GetFileContent(self, request: batches_pb2.FileRef, context):
        data = await self._api.content(current_caller(), request.file_id)
        for start in range(0, len(data), CHUNK_BYTES):
            yield batches_pb2.FileContentChunk(data=data[start:start + CHUNK_BYTES])

    async def DeleteFile(self, request: batches_pb2.FileRef, context):
        row = await self._api.delete_file(current_caller(), request.file_id)
        return batches_pb2.DeleteFileResponse(id=row["id"], deleted=True)

    async def ListFiles(self, request: batches_pb2.ListFilesRequest, context):
        rows, more = await self._api.files(current_caller(), request.purpose or None, request.limit or 20,
                                           request.after or None)
        return batches_pb2.ListFilesResponse(files=[file_message(r) for r in rows], has_more=more)

    async def CreateBatch(self, request: batches_pb2.CreateBatchRequest, context):
        return batch_message(await self._api.create_batch(
            current_caller(), request.endpoint, request.input_file_id, request.completion_window or "24h",
            dict(request.metadata)))

    async def GetBatch(self, request: batches_pb2.BatchRef, context):
        return batch_message(await self._api.batch(current_caller(), request.batch_id))

    async def CancelBatch(self, request: batches_pb2.BatchRef, context):
        return batch_message(await self._api.cancel(current_caller(), request.batch_id))

    async def ListBatches(self, request: batches_pb2.ListBatchesRequest, context):
        rows, more = await self._api.batches(current_caller(), request.limit or 20, request.after or None)
        return batches_pb2.ListBatchesResponse(batches=[batch_message(r) for r in rows], has_more=more)

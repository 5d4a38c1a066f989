"""Document RPCs of the public API, relayed to the retrieval service with the caller's tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from inference_mesh.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.errors import unavailable
from services.gateway.auth import Caller
from services.gateway.errors import from_rpc_error

NOT_CONFIGURED = unavailable("retrieval is not configured on this gateway")


class DocumentsRelay:
    """Each call is bounded by the timeout its caller computed (the gateway's setting for that RPC, or less)."""

    def __init__(self, stub: retrieval_pb2_grpc.RetrievalStub | None) -> None:
        self._stub = stub

    def _require(self) -> retrieval_pb2_grpc.RetrievalStub:
        if self._stub is None:
            raise NOT_CONFIGURED
        return self._stub

    async def upsert(self, caller: Caller, batches: AsyncIterator[retrieval_pb2.UpsertDocumentsRequest],
                     timeout_s: float) -> retrieval_pb2.UpsertDocumentsResponse:
        stub = self._require()

        async def scoped():
            async for batch in batches:
                yield retrieval_pb2.TenantUpsertRequest(tenant=caller.tenant, request=batch,
                                                        max_vectors=caller.max_stored_vectors)
        try:
            return await stub.UpsertDocuments(scoped(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "retrieval") from exc

    async def delete(self, caller: Caller, request: retrieval_pb2.DeleteDocumentsRequest,
                     timeout_s: float) -> retrieval_pb2.DeleteDocumentsResponse:
        try:
            return await self._require().DeleteDocuments(
                retrieval_pb2.TenantDeleteRequest(tenant=caller.tenant, request=request),
                timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "retrieval") from exc

    async def search(self, caller: Caller, request: retrieval_pb2.SearchRequest,
                     timeout_s: float) -> retrieval_pb2.SearchResponse:
        try:
            return await self._require().Search(
                retrieval_pb2.TenantSearchRequest(tenant=caller.tenant, request=request),
                timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "retrieval") from exc

    async def stats(self, caller: Caller, timeout_s: float) -> retrieval_pb2.CollectionStatsResponse:
        try:
            return await self._require().CollectionStats(
                retrieval_pb2.TenantStatsRequest(tenant=caller.tenant), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "retrieval") from exc

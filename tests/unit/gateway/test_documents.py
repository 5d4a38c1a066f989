"""The documents relay (services/gateway/documents.py) against a scripted retrieval service: the tenant is always
the caller's, the storage quota travels with every batch, and failures read as the caller's statuses."""

from __future__ import annotations

import grpc
import pytest

from inference_mesh.v1 import retrieval_pb2
from services.common.errors import MeshError
from services.gateway.auth import Caller
from services.gateway.documents import DocumentsRelay
from tests.unit.fakes import rpc_error

CALLER = Caller("tenant-a", "standard", max_stored_vectors=6)


class ScriptedRetrieval:
    def __init__(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.error, self.asked = error, []

    async def Search(self, request, timeout: float):  # noqa: ASYNC109 - the stub's signature
        self.asked.append((request, timeout))
        if self.error is not None:
            raise self.error
        return retrieval_pb2.SearchResponse()

    async def UpsertDocuments(self, batches, timeout: float):  # noqa: ASYNC109 - the stub's signature
        async for batch in batches:
            self.asked.append((batch, timeout))
        return retrieval_pb2.UpsertDocumentsResponse()


async def test_retrieval_not_configured_is_unavailable_and_says_so():
    with pytest.raises(MeshError) as refused:
        await DocumentsRelay(None).search(CALLER, retrieval_pb2.SearchRequest(query="q"), 1.0)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "not configured" in refused.value.message


async def test_a_search_is_scoped_to_the_callers_tenant_within_the_timeout_given():
    retrieval = ScriptedRetrieval()
    await DocumentsRelay(retrieval).search(CALLER, retrieval_pb2.SearchRequest(query="q", top_k=3), 1.5)
    (sent, timeout), = retrieval.asked
    assert sent.tenant == "tenant-a" and sent.request.top_k == 3 and timeout == 1.5


async def test_every_ingest_batch_carries_the_tenant_and_its_storage_quota():
    retrieval = ScriptedRetrieval()

    async def batches():
        for name in ("a", "b"):
            yield retrieval_pb2.UpsertDocumentsRequest(documents=[retrieval_pb2.Document(id=name, text="t")])
    await DocumentsRelay(retrieval).upsert(CALLER, batches(), 60.0)
    assert [(b.tenant, b.max_vectors, b.request.documents[0].id) for b, _ in retrieval.asked] == \
        [("tenant-a", 6, "a"), ("tenant-a", 6, "b")]


async def test_a_cancelled_hop_is_unavailable_and_an_internal_one_hides_its_detail():
    with pytest.raises(MeshError) as cancelled:
        await DocumentsRelay(ScriptedRetrieval(rpc_error(grpc.StatusCode.CANCELLED, "gone"))).search(
            CALLER, retrieval_pb2.SearchRequest(query="q"), 1.0)
    assert cancelled.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(MeshError) as broken:
        await DocumentsRelay(ScriptedRetrieval(rpc_error(grpc.StatusCode.INTERNAL, "milvus at 10.0.0.7:19530"))).search(
            CALLER, retrieval_pb2.SearchRequest(query="q"), 1.0)
    assert broken.value.code == grpc.StatusCode.INTERNAL and "10.0.0.7" not in broken.value.message

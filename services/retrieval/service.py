"""The Retrieval service: ingest (chunk → embed through Triton → Milvus), delete, search, stats."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
from pymilvus.exceptions import MilvusException
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.deadlines import downstream_timeout
from services.common.embeddings import embed_via_kserve
from services.common.errors import exhausted, internal_failure, invalid, unavailable
from services.retrieval.chunking import Chunker
from services.retrieval.filters import FilterError, render, to_milvus
from services.retrieval.fusion import cosine, reciprocal_rank_fusion
from services.retrieval.index import DocumentIndex
from services.retrieval.lexical import lexical_text, unglue
from services.retrieval.metrics import STAGE_SECONDS
from services.retrieval.settings import RetrievalSettings
from services.retrieval.typed_filters import from_message


def _connection_error(exc: MilvusException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("connect", "unavailable", "deadline", "timeout", "closed"))


_MODES = {retrieval_pb2.SEARCH_MODE_DENSE: "dense", retrieval_pb2.SEARCH_MODE_SPARSE: "sparse",
          retrieval_pb2.SEARCH_MODE_HYBRID: "hybrid"}
_STAGES = {mode: f"{name}_search" for mode, name in _MODES.items()}
_ID = re.compile(r"^[A-Za-z0-9._:/@+-]{1,200}$")
_TENANT = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


class RetrievalService(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(self, settings: RetrievalSettings, index: DocumentIndex, chunker: Chunker,
                 router: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        self._settings = settings
        self._index = index
        self._chunker = chunker
        self._router = router

    @staticmethod
    def _tenant(tenant: str) -> str:
        if not _TENANT.match(tenant):
            raise invalid("tenant must be 1-128 characters of [A-Za-z0-9._:@-]")
        return tenant

    async def _milvus_unavailable(self, exc: Exception) -> None:
        await self._index.mark_unavailable()
        raise internal_failure("vector database unavailable", exc)

    async def _embed(self, texts: list[str], context: grpc.aio.ServicerContext) -> list[list[float]]:
        try:
            with STAGE_SECONDS.labels("embed").time():
                vectors, _ = await embed_via_kserve(self._router, self._settings.embedder_model, texts,
                                                    self._settings.embed_batch,
                                                    downstream_timeout(context, self._settings.embed_timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise unavailable(f"embedding model unavailable: {exc.details()}") from exc
        return vectors.tolist()

    def _check_documents(self, documents) -> None:
        limits = self._settings
        if not documents:
            raise invalid("documents is empty")
        if len(documents) > limits.max_documents_per_batch:
            raise invalid(f"{len(documents)} documents in one batch; the limit is "
                          f"{limits.max_documents_per_batch}: send more batches on the stream")
        for i, document in enumerate(documents):
            if not _ID.match(document.id):
                raise invalid(f"documents[{i}].id must be 1-200 characters of [A-Za-z0-9._:/@+-]")
            if not document.text.strip():
                raise invalid(f"documents[{i}] ({document.id}) has no text")
            if len(document.text) > limits.max_document_chars:
                raise invalid(f"documents[{i}] ({document.id}) is {len(document.text)} characters; the limit "
                              f"is {limits.max_document_chars}: split it into several documents")

    async def UpsertDocuments(self, request_iterator, context):
        started = time.perf_counter()
        documents = chunks = 0
        async for batch in request_iterator:
            tenant = self._tenant(batch.tenant)
            docs = list(batch.request.documents)
            self._check_documents(docs)
            if not self._index.ready and not await self._index.connect():
                raise unavailable("vector database unavailable")
            # Chunking is CPU work: keep the event loop free for other calls.
            split = await asyncio.to_thread(lambda docs=docs: [self._chunker.split(d.text) for d in docs])
            # One row per passage of each chunk: passages are embedded and matched, the chunk is returned.
            passages = [(d, c, j, passage) for d, pieces in zip(docs, split, strict=True) for c in pieces
                        for j, passage in enumerate(c.passages if self._index.passages else (unglue(c.text),))]
            rows = [{"document_id": d.id, "chunk_id": f"{d.id}#{c.index}", "passage": j, "text": c.text,
                     "heading": c.heading_path[:1_000], "metadata": dict(d.metadata)} for d, c, j, _ in passages]
            if self._index.lexical:
                for row, (*_, passage) in zip(rows, passages, strict=True):
                    row["terms"] = lexical_text(passage)
            if batch.max_vectors:
                await self._check_storage(tenant, len(rows), docs, batch.max_vectors)
            vectors = await self._embed([passage for *_, passage in passages], context)
            for row, vector in zip(rows, vectors, strict=True):
                row["vector"] = vector
            try:
                await self._index.replace_documents(tenant, rows, [d.id for d in docs])
            except Exception as exc:  # pymilvus raises several types for one cause
                await self._milvus_unavailable(exc)
            documents += len(docs)
            chunks += sum(len(pieces) for pieces in split)
        return retrieval_pb2.UpsertDocumentsResponse(documents=documents, chunks=chunks,
                                                     seconds=time.perf_counter() - started)

    async def _check_storage(self, tenant: str, new_vectors: int, docs, max_vectors: int) -> None:
        try:
            after = await self._index.vectors_after(tenant, new_vectors, [d.id for d in docs])
        except Exception as exc:
            await self._milvus_unavailable(exc)
        if after > max_vectors:
            raise exhausted(f"storage quota: this batch would leave the tenant {after} stored vectors (one per chunk "
                            f"passage); its tier keeps at most {max_vectors}. Delete documents, or ask for a larger "
                            "tier; the batches before this one were stored")

    async def DeleteDocuments(self, request, context):
        tenant = self._tenant(request.tenant)
        ids = list(request.request.ids)
        if not ids or not all(_ID.match(i) for i in ids):
            raise invalid("ids must be 1 or more document ids of [A-Za-z0-9._:/@+-]")
        try:
            deleted = await self._index.delete_documents(tenant, ids)
        except Exception as exc:
            await self._milvus_unavailable(exc)
        return retrieval_pb2.DeleteDocumentsResponse(chunks_deleted=deleted)

    def _mode(self, query: retrieval_pb2.SearchRequest) -> int:
        # A vector has no words to match: unspecified means dense for it.
        lexical = self._index.lexical and not query.vector
        default = retrieval_pb2.SEARCH_MODE_HYBRID if lexical else retrieval_pb2.SEARCH_MODE_DENSE
        mode = query.mode or default
        if mode not in _MODES:
            raise invalid(f"mode {query.mode} is not one of dense, sparse, hybrid")
        if mode != retrieval_pb2.SEARCH_MODE_DENSE:
            name = _MODES[mode]
            if query.vector:
                raise invalid(f"mode {name} searches words: send query text, not a vector (or use mode dense)")
            if not self._index.lexical:
                raise invalid(f"mode {name} needs BM25, which this collection lacks (created without it, or on a "
                              "Milvus older than 2.5): use mode dense")
        return mode

    async def Search(self, request, context):
        tenant = self._tenant(request.tenant)
        query = request.request
        limits = self._settings
        if not 1 <= query.top_k <= limits.max_top_k:
            raise invalid(f"top_k must be within 1..{limits.max_top_k}, got {query.top_k}")
        if query.ef > limits.max_ef:
            raise invalid(f"ef must be at most {limits.max_ef}")
        if bool(query.query.strip()) == bool(query.vector):
            raise invalid("send either query (text) or vector, not both")
        if query.vector and self._index.dimension and len(query.vector) != self._index.dimension:
            raise invalid(f"vector has dimension {len(query.vector)}; the index uses {self._index.dimension}")
        if query.filter and query.HasField("where"):
            raise invalid("send the filter as text (filter) or as a tree (where), not both")
        try:
            user_filter = render(from_message(query.where)) if query.HasField("where") \
                else to_milvus(query.filter, limits.max_filter_chars)
        except FilterError as exc:
            raise invalid(str(exc)) from exc
        if not self._index.ready:
            raise unavailable("vector database unavailable; retrying in the background")
        mode = self._mode(query)
        depth = max(query.top_k, limits.fusion_depth) if mode == retrieval_pb2.SEARCH_MODE_HYBRID else query.top_k
        lexical: asyncio.Future[list[dict]] | None = None
        if mode != retrieval_pb2.SEARCH_MODE_DENSE:
            # BM25 needs no embedding: it runs while the query is embedded, so hybrid costs little over dense.
            lexical = asyncio.ensure_future(self._index.sparse(
                tenant, lexical_text(query.query), depth, user_filter,
                with_vectors=mode == retrieval_pb2.SEARCH_MODE_HYBRID))
            lexical.add_done_callback(lambda done: done.cancelled() or done.exception())
        vector: list[float] = []
        try:
            if mode != retrieval_pb2.SEARCH_MODE_SPARSE:
                vector = list(query.vector) if query.vector else (await self._embed([query.query], context))[0]
        except BaseException:
            if lexical is not None:
                lexical.cancel()
            raise
        try:
            with STAGE_SECONDS.labels(_STAGES[mode]).time():
                hits = await self._find(mode, tenant, query, vector, user_filter, depth, lexical)
        except MilvusException as exc:
            if user_filter and not _connection_error(exc):
                raise invalid(f"filter rejected by Milvus: {exc.message}") from exc
            await self._milvus_unavailable(exc)
        except Exception as exc:  # pymilvus raises several types for one cause
            await self._milvus_unavailable(exc)
        response = retrieval_pb2.SearchResponse(mode=mode)
        for hit in hits:
            response.hits.add(chunk_id=hit["chunk_id"], document_id=hit["document_id"], text=hit["text"],
                              score=hit["score"], similarity=hit.get("similarity", 0.0),
                              heading_path=hit.get("heading") or "",
                              metadata={k: str(v) for k, v in (hit["metadata"] or {}).items()})
        return response

    async def _find(self, mode: int, tenant: str, query: retrieval_pb2.SearchRequest, vector: list[float],
                    user_filter: str, depth: int, lexical: asyncio.Future[list[dict]] | None) -> list[dict]:
        settings = self._settings
        ef = query.ef or settings.hnsw.ef
        if mode == retrieval_pb2.SEARCH_MODE_SPARSE and lexical is not None:
            # Not Milvus' BM25 values: their IDF counts every tenant's chunks, so a tenant could watch a term's
            # score move as other tenants ingest it. The rank's reciprocal (as fused) says only what it may.
            return [dict(hit, score=1.0 / (settings.rrf_k + rank)) for rank, hit in enumerate(await lexical, 1)]
        dense = await self._index.dense(tenant, vector, depth, user_filter, ef)
        if mode == retrieval_pb2.SEARCH_MODE_DENSE or lexical is None:
            return [dict(hit, similarity=hit["score"]) for hit in dense]
        sparse = await lexical
        by_key = {hit["chunk_id"]: dict(hit, similarity=hit["score"]) for hit in dense}
        lexical_only = [hit for hit in sparse if hit["chunk_id"] not in by_key]
        for hit, similarity in zip(lexical_only, cosine(vector, [hit["vector"] for hit in lexical_only]),
                                   strict=True):
            by_key[hit["chunk_id"]] = dict(hit, similarity=similarity)
        fused = reciprocal_rank_fusion([[hit["chunk_id"] for hit in dense], [hit["chunk_id"] for hit in sparse]],
                                       settings.rrf_k, [settings.dense_weight, settings.lexical_weight])
        return [dict(by_key[key], score=score) for key, score in fused[:query.top_k]]

    async def CollectionStats(self, request, context):
        tenant = self._tenant(request.tenant)
        try:
            count = await self._index.count(tenant)
        except Exception as exc:
            await self._milvus_unavailable(exc)
        return retrieval_pb2.CollectionStatsResponse(
            chunks=count, dimension=self._index.dimension, index=self._index.describe())

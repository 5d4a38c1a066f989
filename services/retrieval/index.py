"""Document chunks in Milvus: partition key per tenant, HNSW (cosine) on embeddings and BM25 on stemmed terms,
replace-by-document-id upserts."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from pymilvus import AsyncMilvusClient, DataType, Function, FunctionType

from services.common.milvus import (
    HnswSettings,
    MilvusCollection,
    MilvusTimeouts,
    create_collection,
    hnsw_cosine_index,
    quote,
)
from services.retrieval.lexical import ANALYZER_PARAMS

log = logging.getLogger(__name__)
_OUTPUT = ["chunk_id", "document_id", "text", "metadata"]
# BM25's usual constants: k1 saturates a term's repeats, b normalises by chunk length.
_BM25_INDEX = {"index_type": "SPARSE_INVERTED_INDEX", "metric_type": "BM25", "params": {"bm25_k1": 1.2, "bm25_b": 0.75}}


def primary_key(tenant: str, chunk_id: str, version: str = "") -> str:
    # Two tenants may use the same document ids: the key includes the tenant.
    return hashlib.sha256(f"{tenant}\x00{chunk_id}\x00{version}".encode()).hexdigest()


class DocumentIndex(MilvusCollection):
    """lexical: create collections with a BM25 field (Milvus 2.5 and later, and Milvus Lite 3). A collection
    created without one (by an older Milvus or an earlier version of the mesh) is searched dense-only."""

    def __init__(self, uri: str, collection: str, dimension: Callable[[], Awaitable[int]], hnsw: HnswSettings,
                 timeouts: MilvusTimeouts, consistency_level: str = "Session", lexical: bool = True,
                 over_fetch: int = 1) -> None:
        super().__init__(uri, collection, timeouts, dimension, self._create_collection)
        self._consistency = consistency_level
        self._hnsw = hnsw
        self._create_lexical = lexical
        # Rows asked for per chunk wanted: more than one when chunks are searched by several passages.
        self._over_fetch = max(1, over_fetch)
        self.lexical = False
        self.passages = False
        self._output = list(_OUTPUT)

    async def _create_collection(self, client: AsyncMilvusClient, name: str) -> None:
        schema = AsyncMilvusClient.create_schema(auto_id=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("tenant", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=256)
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=300)
        schema.add_field("text", DataType.VARCHAR, max_length=65_535)
        schema.add_field("heading", DataType.VARCHAR, max_length=4_096)
        # Rows are passages of chunks: `passage` numbers them within their chunk, `text` is the whole chunk.
        schema.add_field("passage", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
        indexes = [("vector", hnsw_cosine_index(self._hnsw))]
        if self._create_lexical:
            # The stemmed terms of the chunk (services/retrieval/lexical.py); Milvus computes BM25 weights from them.
            schema.add_field("terms", DataType.VARCHAR, max_length=65_535, enable_analyzer=True,
                             analyzer_params=ANALYZER_PARAMS)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="terms_bm25", function_type=FunctionType.BM25,
                                         input_field_names=["terms"], output_field_names=["sparse"]))
            indexes.append(("sparse", _BM25_INDEX))
        await create_collection(client, name, schema, indexes, self.timeouts.create_s,
                                consistency_level=self._consistency)

    async def _loaded(self, client: AsyncMilvusClient) -> None:
        described = await client.describe_collection(self.name, timeout=self.timeouts.query_s)
        fields = {field["name"] for field in described["fields"]}
        self.lexical = "sparse" in fields
        self.passages = "passage" in fields
        self._output = _OUTPUT + (["heading"] if "heading" in fields else [])
        if self._create_lexical and not self.lexical:
            log.warning("collection has no BM25 field: searches are dense-only until it is re-created",
                        extra={"collection": self.name})

    def describe(self) -> str:
        return self._hnsw.describe() + (" + BM25 (SPARSE_INVERTED_INDEX)" if self.lexical else "")

    async def replace_documents(self, tenant: str, rows: list[dict], document_ids: list[str]) -> None:
        """Insert the new version under new keys first, then delete the old version's chunks. A reader, or a
        failure half way, finds the old version or the new one (for a moment both), never neither. Keys carry
        a per-ingest version because not every Milvus (2.3 with a partition key) has upsert."""
        previous = await self._chunk_keys(tenant, document_ids)
        version = uuid.uuid4().hex
        for row in rows:
            row["pk"] = primary_key(tenant, f"{row['chunk_id']}@{row.get('passage', 0)}", version)
            row["tenant"] = tenant
            if not self.passages:
                row.pop("passage", None)
        if rows:
            await self.run(lambda client: client.insert(self.name, rows, timeout=self.timeouts.write_s))
        if previous:
            if rows:
                await self._searchable(tenant, rows)
            await self.run(lambda client: client.delete(self.name, ids=previous, timeout=self.timeouts.query_s))

    async def _searchable(self, tenant: str, rows: list[dict]) -> None:
        """Waits (bounded) until a vector search finds the rows just inserted. A delete can be visible to searches
        before an insert acknowledged earlier is (seen with milvus-lite: a search during a re-ingest found
        neither version); deleting the old version only once the new one is found keeps "old or new, never
        neither". After the bound the delete goes ahead: a moment without the document beats keeping both."""
        keys = [row["pk"] for row in rows]
        expr = f"tenant == {quote(tenant)} and pk in [{', '.join(quote(k) for k in keys)}]"
        deadline = time.monotonic() + self.timeouts.search_s
        while True:
            hits = await self.run(lambda client: client.search(
                self.name, data=[rows[0]["vector"]], filter=expr, limit=len(keys), output_fields=["pk"],
                timeout=self.timeouts.search_s, consistency_level="Strong"))
            if hits and len(hits[0]) >= len(keys):
                return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.02)

    async def _chunk_keys(self, tenant: str, document_ids: list[str]) -> list[str]:
        ids = ", ".join(quote(d) for d in document_ids)
        expr = f"tenant == {quote(tenant)} and document_id in [{ids}]"
        # Strong: replacing or deleting must see every chunk written so far, wherever it was written.
        rows = await self.run(lambda client: client.query(self.name, filter=expr, output_fields=["pk"],
                                                          timeout=self.timeouts.query_s, consistency_level="Strong"))
        return [row["pk"] for row in rows]

    async def vectors_after(self, tenant: str, new_vectors: int, document_ids: list[str]) -> int:
        """What the tenant would store once these documents are replaced by `new_vectors` rows: its quota is
        checked before anything is embedded. Two concurrent ingests may each fit and together pass it by one
        batch; the next is refused."""
        expr = f"tenant == {quote(tenant)}"
        rows = await self.run(lambda client: client.query(self.name, filter=expr, output_fields=["count(*)"],
                                                          timeout=self.timeouts.query_s, consistency_level="Strong"))
        held = int(rows[0]["count(*)"]) if rows else 0
        return held - len(await self._chunk_keys(tenant, document_ids)) + new_vectors

    async def delete_documents(self, tenant: str, document_ids: list[str]) -> int:
        """Deletes by primary key after a query, so the count is exact whatever the backend reports."""
        keys = await self._chunk_keys(tenant, document_ids)
        if keys:
            await self.run(lambda client: client.delete(self.name, ids=keys, timeout=self.timeouts.query_s))
        return len(keys)

    def _filter(self, tenant: str, user_filter: str) -> str:
        return f"tenant == {quote(tenant)}" + (f" and ({user_filter})" if user_filter else "")

    def _fetch(self, limit: int) -> int:
        # Several passages of one chunk may be found: ask for more, keep each chunk's best.
        return min(limit * self._over_fetch, 16_384)

    @staticmethod
    def _distinct(hits: list[dict], limit: int) -> list[dict]:
        best: dict[str, dict] = {}
        for hit in hits:
            best.setdefault(hit["chunk_id"], hit)
        return list(best.values())[:limit]

    async def dense(self, tenant: str, vector: list[float], limit: int, user_filter: str, ef: int) -> list[dict]:
        """Nearest chunks by their best passage's cosine similarity (the hit's `score`)."""
        fetch = self._fetch(limit)
        hits = await self.run(lambda client: client.search(
            self.name, data=[vector], anns_field="vector", filter=self._filter(tenant, user_filter), limit=fetch,
            output_fields=self._output, search_params={"params": {"ef": max(ef, fetch)}},
            timeout=self.timeouts.search_s, consistency_level=self._consistency))
        return self._distinct([dict(hit["entity"], score=float(hit["distance"])) for hit in (hits[0] if hits else [])],
                              limit)

    async def sparse(self, tenant: str, terms: str, limit: int, user_filter: str,
                     with_vectors: bool = False) -> list[dict]:
        """Best chunks by BM25 over the query's stemmed terms (the hit's `score`); with_vectors also returns
        each chunk's embedding, so the caller can say how similar it is."""
        if not terms or not self.lexical:
            return []
        output = self._output + (["vector"] if with_vectors else [])
        hits = await self.run(lambda client: client.search(
            self.name, data=[terms], anns_field="sparse", filter=self._filter(tenant, user_filter),
            limit=self._fetch(limit), output_fields=output, search_params={"metric_type": "BM25"},
            timeout=self.timeouts.search_s, consistency_level=self._consistency))
        # Milvus Lite reports BM25 as a distance (negated: smaller is closer); a cluster reports the score.
        return self._distinct([dict(hit["entity"], score=abs(float(hit["distance"])))
                               for hit in (hits[0] if hits else [])], limit)

    async def count(self, tenant: str) -> int:
        """The tenant's chunks (one row per passage: the first passages are counted)."""
        expr = f"tenant == {quote(tenant)}" + (" and passage == 0" if self.passages else "")
        rows = await self.run(lambda client: client.query(self.name, filter=expr, output_fields=["count(*)"],
                                                          timeout=self.timeouts.query_s, consistency_level="Strong"))
        return int(rows[0]["count(*)"]) if rows else 0

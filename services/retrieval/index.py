"""Document chunks in Milvus: partition key per tenant, HNSW (cosine), replace-by-document-id upserts."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable

from pymilvus import AsyncMilvusClient, DataType

from services.common.milvus import HnswSettings, MilvusCollection, MilvusTimeouts, hnsw_cosine_index, quote

_OUTPUT = ["chunk_id", "document_id", "text", "metadata"]


def primary_key(tenant: str, chunk_id: str, version: str = "") -> str:
    # Two tenants may use the same document ids: the key includes the tenant.
    return hashlib.sha256(f"{tenant}\x00{chunk_id}\x00{version}".encode()).hexdigest()


class DocumentIndex(MilvusCollection):
    def __init__(self, uri: str, collection: str, dimension: Callable[[], Awaitable[int]], hnsw: HnswSettings,
                 timeouts: MilvusTimeouts, consistency_level: str = "Session") -> None:
        super().__init__(uri, collection, timeouts, dimension, self._create_collection)
        self._consistency = consistency_level
        self._hnsw = hnsw

    async def _create_collection(self, client: AsyncMilvusClient, name: str) -> None:
        schema = AsyncMilvusClient.create_schema(auto_id=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("tenant", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=256)
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=300)
        schema.add_field("text", DataType.VARCHAR, max_length=65_535)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
        await client.create_collection(name, schema=schema,
                                       index_params=hnsw_cosine_index("vector", self._hnsw),
                                       timeout=self.timeouts.create_s,
                                       consistency_level=self._consistency)

    async def replace_documents(self, tenant: str, rows: list[dict], document_ids: list[str]) -> None:
        """Insert the new version under new keys first, then delete the old version's chunks. A reader, or a
        failure half way, finds the old version or the new one (for a moment both), never neither. Keys carry
        a per-ingest version because not every Milvus (2.3 with a partition key) has upsert."""
        previous = await self._chunk_keys(tenant, document_ids)
        version = uuid.uuid4().hex
        for row in rows:
            row["pk"] = primary_key(tenant, row["chunk_id"], version)
            row["tenant"] = tenant
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

    async def delete_documents(self, tenant: str, document_ids: list[str]) -> int:
        """Deletes by primary key after a query, so the count is exact whatever the backend reports."""
        keys = await self._chunk_keys(tenant, document_ids)
        if keys:
            await self.run(lambda client: client.delete(self.name, ids=keys, timeout=self.timeouts.query_s))
        return len(keys)

    async def search(self, tenant: str, vector: list[float], top_k: int, user_filter: str, ef: int) -> list[dict]:
        expr = f"tenant == {quote(tenant)}" + (f" and ({user_filter})" if user_filter else "")
        hits = await self.run(lambda client: client.search(
            self.name, data=[vector], filter=expr, limit=top_k, output_fields=_OUTPUT,
            search_params={"params": {"ef": max(ef, top_k)}}, timeout=self.timeouts.search_s,
            consistency_level=self._consistency))
        return [dict(hit["entity"], score=float(hit["distance"])) for hit in (hits[0] if hits else [])]

    async def count(self, tenant: str) -> int:
        expr = f"tenant == {quote(tenant)}"
        rows = await self.run(lambda client: client.query(self.name, filter=expr, output_fields=["count(*)"],
                                                          timeout=self.timeouts.query_s, consistency_level="Strong"))
        return int(rows[0]["count(*)"]) if rows else 0

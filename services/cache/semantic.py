"""The semantic index in Milvus (HNSW, cosine): prompt vectors pointing at exact entries in Redis.

Rows are partitioned by tenant (partition key) and filtered by model, version, flush generation, the
digest of everything but the user's text, and expiry, so a hit can only come from the same context. Each row
keeps the user text it was made from, which the gate (gate.py) explains against the question.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pymilvus import AsyncMilvusClient, DataType

from services.common.milvus import (
    HnswSettings,
    MilvusCollection,
    MilvusTimeouts,
    create_collection,
    hnsw_cosine_index,
    quote,
)


@dataclass(frozen=True)
class Candidate:
    entry: str          # the row id: what a semantic hit names, and what a wrong-hit report excludes
    response_key: str
    similarity: float
    text: str


class SemanticIndex(MilvusCollection):
    def __init__(self, uri: str, collection: str, dimension: Callable[[], Awaitable[int]], hnsw: HnswSettings,
                 timeouts: MilvusTimeouts, max_text_chars: int) -> None:
        super().__init__(uri, collection, timeouts, dimension, self._create_collection)
        self._hnsw = hnsw
        self._max_text_chars = max_text_chars

    async def _create_collection(self, client: AsyncMilvusClient, name: str) -> None:
        schema = AsyncMilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("tenant", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("model", DataType.VARCHAR, max_length=128)
        schema.add_field("version", DataType.VARCHAR, max_length=64)
        schema.add_field("generation", DataType.VARCHAR, max_length=64)
        schema.add_field("context", DataType.VARCHAR, max_length=64)
        schema.add_field("response_key", DataType.VARCHAR, max_length=512)
        # Milvus counts bytes: four per character covers any UTF-8.
        schema.add_field("text", DataType.VARCHAR, max_length=4 * self._max_text_chars)
        schema.add_field("expires_at", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
        await create_collection(client, name, schema, [("vector", hnsw_cosine_index(self._hnsw))],
                                self.timeouts.create_s)

    async def search(self, vector: list[float], tenant: str, model: str, version: str, generation: str,
                     context: str, limit: int) -> list[Candidate]:
        """The closest live entries in the same scope and context, most similar first."""
        expr = (f"tenant == {quote(tenant)} and model == {quote(model)} and version == {quote(version)} "
                f"and generation == {quote(generation)} and context == {quote(context)} "
                f"and expires_at > {int(time.time())}")
        hits = await self.run(lambda client: client.search(
            self.name, data=[vector], filter=expr, limit=limit, output_fields=["response_key", "text"],
            search_params={"params": {"ef": max(self._hnsw.ef, limit)}}, timeout=self.timeouts.search_s))
        if not hits:
            return []
        return [Candidate(str(hit["id"]), hit["entity"]["response_key"], float(hit["distance"]), hit["entity"]["text"])
                for hit in hits[0]]

    async def text_of(self, entry: str, tenant: str) -> str | None:
        """The user text of a live entry of this tenant; None when there is none."""
        rows = await self.run(lambda client: client.query(
            self.name, filter=f"id == {quote(entry)} and tenant == {quote(tenant)}", output_fields=["text"],
            timeout=self.timeouts.query_s))
        return rows[0]["text"] if rows else None

    async def add(self, row_id: str, vector: list[float], tenant: str, model: str, version: str, generation: str,
                  context: str, response_key: str, text: str, ttl_s: int) -> None:
        row = {"id": row_id, "tenant": tenant, "model": model, "version": version, "generation": generation,
               "context": context, "response_key": response_key, "text": text,
               "expires_at": int(time.time()) + ttl_s, "vector": vector}
        await self.run(lambda client: client.upsert(self.name, [row], timeout=self.timeouts.write_s))

    async def delete(self, tenant: str = "", model: str = "") -> int:
        clauses = [f"tenant == {quote(tenant)}" if tenant else "", f"model == {quote(model)}" if model else ""]
        expr = " and ".join(c for c in clauses if c)
        result = await self.run(lambda client: client.delete(self.name, filter=expr, timeout=self.timeouts.query_s))
        return int(result.get("delete_count", 0)) if isinstance(result, dict) else 0

    async def delete_expired(self) -> None:
        expr = f"expires_at <= {int(time.time())}"
        await self.run(lambda client: client.delete(self.name, filter=expr, timeout=self.timeouts.query_s))

"""The semantic index in Milvus (HNSW, cosine): prompt vectors pointing at exact entries in Redis.

Rows are partitioned by tenant (partition key) and filtered by model, version, flush generation, the
digest of everything but the user's text, and expiry, so a hit can only come from the same context.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from pymilvus import AsyncMilvusClient, DataType

log = logging.getLogger(__name__)


def _quote(value: str) -> str:
    return json.dumps(value)  # a Milvus string literal with quotes and escapes


class SemanticIndex:
    def __init__(self, uri: str, collection: str, dimension: int, m: int, ef_construction: int, ef: int,
                 timeout_s: float) -> None:
        self._uri = uri
        self._collection = collection
        self._dimension = dimension
        self._m = m
        self._ef_construction = ef_construction
        self._ef = ef
        self._timeout_s = timeout_s
        self._client: AsyncMilvusClient | None = None
        self.ready = False

    async def connect(self) -> bool:
        """Create the collection if needed; False (and retried later) while Milvus is unreachable."""
        try:
            if self._client is None:
                self._client = AsyncMilvusClient(uri=self._uri, timeout=self._timeout_s * 4)
            if not await self._client.has_collection(self._collection, timeout=self._timeout_s * 4):
                await self._create()
            await self._client.load_collection(self._collection, timeout=self._timeout_s * 20)
            self.ready = True
        except Exception as exc:
            log.warning("semantic index unavailable", extra={"error": str(exc)})
            await self.mark_unavailable()
        return self.ready

    async def mark_unavailable(self) -> None:
        """Drop the client: pymilvus' async client does not recover once its server restarts."""
        self.ready = False
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _create(self) -> None:
        schema = AsyncMilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("tenant", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("model", DataType.VARCHAR, max_length=128)
        schema.add_field("version", DataType.VARCHAR, max_length=64)
        schema.add_field("generation", DataType.VARCHAR, max_length=64)
        schema.add_field("context", DataType.VARCHAR, max_length=64)
        schema.add_field("response_key", DataType.VARCHAR, max_length=512)
        schema.add_field("expires_at", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self._dimension)
        index = AsyncMilvusClient.prepare_index_params()
        index.add_index("vector", index_type="HNSW", metric_type="COSINE",
                        params={"M": self._m, "efConstruction": self._ef_construction})
        await self._client.create_collection(self._collection, schema=schema, index_params=index,
                                             timeout=self._timeout_s * 20)

    async def search(self, vector: list[float], tenant: str, model: str, version: str, generation: str,
                     context: str) -> tuple[str, float] | None:
        """(response key, similarity) of the closest live entry in the same scope and context, if any."""
        expr = (f"tenant == {_quote(tenant)} and model == {_quote(model)} and version == {_quote(version)} "
                f"and generation == {_quote(generation)} and context == {_quote(context)} "
                f"and expires_at > {int(time.time())}")
        hits = await self._client.search(self._collection, data=[vector], filter=expr, limit=1,
                                         output_fields=["response_key"], search_params={"params": {"ef": self._ef}},
                                         timeout=self._timeout_s)
        if not hits or not hits[0]:
            return None
        best = hits[0][0]
        return best["entity"]["response_key"], float(best["distance"])

    async def add(self, row_id: str, vector: list[float], tenant: str, model: str, version: str, generation: str,
                  context: str, response_key: str, ttl_s: int) -> None:
        await self._client.upsert(self._collection, [{
            "id": row_id, "tenant": tenant, "model": model, "version": version, "generation": generation,
            "context": context, "response_key": response_key, "expires_at": int(time.time()) + ttl_s,
            "vector": vector,
        }], timeout=self._timeout_s)

    async def delete(self, tenant: str = "", model: str = "") -> int:
        clauses = [f"tenant == {_quote(tenant)}" if tenant else "", f"model == {_quote(model)}" if model else ""]
        result = await self._client.delete(self._collection, filter=" and ".join(c for c in clauses if c),
                                           timeout=self._timeout_s * 4)
        return int(result.get("delete_count", 0)) if isinstance(result, dict) else 0

    async def delete_expired(self) -> None:
        await self._client.delete(self._collection, filter=f"expires_at <= {int(time.time())}",
                                  timeout=self._timeout_s * 4)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

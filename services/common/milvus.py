"""A Milvus collection over pymilvus' async client: created on first use, reconnected after outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pymilvus import AsyncMilvusClient
from pymilvus.exceptions import MilvusException

log = logging.getLogger(__name__)
T = TypeVar("T")


def quote(value: str) -> str:
    """A Milvus string literal, quotes and backslashes escaped."""
    return json.dumps(value)


def hnsw_cosine_index(field: str, m: int, ef_construction: int):
    """Index parameters for an HNSW graph on a vector field, cosine metric (the mesh's vectors are unit norm)."""
    index = AsyncMilvusClient.prepare_index_params()
    index.add_index(field, index_type="HNSW", metric_type="COSINE", params={"M": m, "efConstruction": ef_construction})
    return index


class MilvusCollection:
    def __init__(self, uri: str, name: str, timeout_s: float,
                 create: Callable[[AsyncMilvusClient, str], Awaitable[None]]) -> None:
        self.uri = uri
        self.name = name
        self.timeout_s = timeout_s
        self._create = create
        self._client: AsyncMilvusClient | None = None
        self.ready = False

    @property
    def client(self) -> AsyncMilvusClient:
        if self._client is None or not self.ready:
            raise ConnectionError(f"Milvus at {self.uri} is not available")
        return self._client

    async def connect(self) -> bool:
        """Create the collection if needed and load it; False (retry later) while Milvus is unreachable."""
        try:
            # pymilvus' own reconnect logic can wait without end after a server restart: bound every step here.
            async with asyncio.timeout(self.timeout_s * 10):
                if self._client is None:
                    self._client = AsyncMilvusClient(uri=self.uri, timeout=self.timeout_s * 4)
                if not await self._client.has_collection(self.name, timeout=self.timeout_s * 4):
                    await self._create(self._client, self.name)
                await self._client.load_collection(self.name, timeout=self.timeout_s * 5)
            self.ready = True
        except Exception as exc:  # pymilvus raises several types for one cause: not reachable now
            log.warning("milvus unavailable", extra={"collection": self.name, "error": str(exc)})
            await self.mark_unavailable()
        return self.ready

    async def run(self, operation: Callable[[AsyncMilvusClient], Awaitable[T]]) -> T:
        """Run one call; if Milvus restarted behind our back the collection is no longer loaded: load, retry once."""
        try:
            return await operation(self.client)
        except MilvusException as exc:
            if "released" not in str(exc) and "not loaded" not in str(exc):
                raise
            log.info("reloading collection", extra={"collection": self.name})
            async with asyncio.timeout(self.timeout_s * 5):
                await self.client.load_collection(self.name, timeout=self.timeout_s * 5)
            return await operation(self.client)

    async def mark_unavailable(self) -> None:
        """Drop the client: pymilvus' async client does not recover once its server restarts."""
        self.ready = False
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def close(self) -> None:
        await self.mark_unavailable()

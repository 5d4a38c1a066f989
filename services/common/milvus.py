"""A Milvus collection over pymilvus' async client: created on first use, reconnected after outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlparse

import grpc
from pydantic import BaseModel, Field
from pymilvus import AsyncMilvusClient
from pymilvus.exceptions import MilvusException

log = logging.getLogger(__name__)
T = TypeVar("T")


# pymilvus pings every 10 s even without calls; Milvus (Lite and standalone) keeps gRPC's default of one ping per
# 5 minutes and answers more with GOAWAY too_many_pings, dropping the connection. Ping within what it accepts;
# an outage is noticed by the calls themselves and the reconnect loop (MilvusCollection.connect).
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 330_000, "grpc.keepalive_timeout_ms": 20_000,
                "grpc.keepalive_permit_without_calls": False}


def quote(value: str) -> str:
    """A Milvus string literal, quotes and backslashes escaped."""
    return json.dumps(value)


class HnswSettings(BaseModel, extra="forbid"):
    """One HNSW graph's shape (e.g. MESH_RETRIEVAL_HNSW__M). M=16 and efConstruction=200 keep recall@10 above
    0.95 on sentence embeddings at a few hundred bytes per vector; ef is the search-time candidate list."""

    m: int = Field(default=16, ge=4, le=64)
    ef_construction: int = Field(default=200, ge=8)
    ef: int = Field(default=64, ge=1)

    def describe(self) -> str:
        return f"HNSW(M={self.m}, efConstruction={self.ef_construction}), COSINE"


class MilvusTimeouts(BaseModel, extra="forbid"):
    """Bounds on each kind of Milvus call (e.g. MESH_CACHE_MILVUS_TIMEOUTS__SEARCH_S). A search is on a request's
    path; the others run at ingest, startup or in the background, and a Strong-consistency query waits for
    Milvus' next time tick."""

    search_s: float = Field(default=2.0, gt=0)
    write_s: float = Field(default=20.0, gt=0)     # insert / upsert
    query_s: float = Field(default=8.0, gt=0)      # query, delete, has_collection, the client's default
    load_s: float = Field(default=10.0, gt=0)      # loading a collection into memory
    create_s: float = Field(default=40.0, gt=0)    # creating a collection with its index
    connect_s: float = Field(default=20.0, gt=0)   # the whole connect sequence, and the TCP probe before it


def hnsw_cosine_index(hnsw: HnswSettings) -> dict:
    """An HNSW graph on a vector field, cosine metric (the mesh's vectors are unit norm)."""
    return {"index_type": "HNSW", "metric_type": "COSINE",
            "params": {"M": hnsw.m, "efConstruction": hnsw.ef_construction}}


async def create_collection(client: AsyncMilvusClient, name: str, schema, indexes: list[tuple[str, dict]],
                            timeout_s: float, **options) -> None:
    """The collection, then each (field, index) one by one, each checked by describe_index. pymilvus waits for
    an index through GetIndexState, which Milvus Lite 3 does not implement (UNIMPLEMENTED, after the index was
    made): with the indexes passed to create_collection the first failed wait skipped the others."""
    await client.create_collection(name, schema=schema, timeout=timeout_s, **options)
    for field, params in indexes:
        one = AsyncMilvusClient.prepare_index_params()
        one.add_index(field, **params)
        try:
            await client.create_index(name, one, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        if not await client.describe_index(name, field, timeout=timeout_s):
            raise MilvusException(message=f"index on {name}.{field} was not created")


class MilvusCollection:
    """dimension: where the vector size comes from (the registry, through the router); asked until it answers."""

    def __init__(self, uri: str, name: str, timeouts: MilvusTimeouts, dimension: Callable[[], Awaitable[int]],
                 create: Callable[[AsyncMilvusClient, str], Awaitable[None]]) -> None:
        self.uri = uri
        self.name = name
        self.timeouts = timeouts
        self.dimension = 0
        self._dimension_source = dimension
        self._create = create
        self._client: AsyncMilvusClient | None = None
        self.ready = False

    @property
    def client(self) -> AsyncMilvusClient:
        if self._client is None or not self.ready:
            raise ConnectionError(f"Milvus at {self.uri} is not available")
        return self._client

    async def _listening(self) -> bool:
        """A non-blocking TCP probe. pymilvus' client setup blocks the event loop while the server is down
        (stalling every other call of the service, Redis hits included), so it is only tried once the port
        accepts connections."""
        address = urlparse(self.uri if "://" in self.uri else f"http://{self.uri}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address.hostname or "127.0.0.1", address.port or 19530),
                self.timeouts.search_s)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def connect(self) -> bool:
        """Create the collection if needed and load it; False (retry later) while Milvus is unreachable or the
        vector size is not known yet."""
        if not self.dimension:
            self.dimension = await self._dimension_source()
            if not self.dimension:
                log.warning("vector size unknown: the router has not answered with the embedder's registry entry",
                            extra={"collection": self.name})
                return False
        if not await self._listening():
            await self.mark_unavailable()
            return False
        try:
            # pymilvus' own reconnect logic can wait without end after a server restart: bound every step here.
            async with asyncio.timeout(self.timeouts.connect_s):
                if self._client is None:
                    # Dedicated: pymilvus 3 shares one connection per address between clients, so a "new" client
                    # after a restart got the old, broken one back, and search stayed UNAVAILABLE.
                    self._client = AsyncMilvusClient(uri=self.uri, timeout=self.timeouts.query_s, dedicated=True,
                                                     grpc_options=GRPC_OPTIONS)
                if not await self._client.has_collection(self.name, timeout=self.timeouts.query_s):
                    await self._create(self._client, self.name)
                await self._client.load_collection(self.name, timeout=self.timeouts.load_s)
                await self._loaded(self._client)
            self.ready = True
        except Exception as exc:  # pymilvus raises several types for one cause: not reachable now
            log.warning("milvus unavailable", extra={"collection": self.name, "error": str(exc)})
            await self.mark_unavailable()
        return self.ready

    async def _loaded(self, client: AsyncMilvusClient) -> None:
        """Called once the collection is loaded, before it is marked ready: learn what it was created with."""

    async def run(self, operation: Callable[[AsyncMilvusClient], Awaitable[T]]) -> T:
        """Run one call; if Milvus restarted behind our back the collection is no longer loaded: load, retry once."""
        try:
            return await operation(self.client)
        except MilvusException as exc:
            if "released" not in str(exc) and "not loaded" not in str(exc):
                raise
            log.info("reloading collection", extra={"collection": self.name})
            async with asyncio.timeout(self.timeouts.load_s):
                await self.client.load_collection(self.name, timeout=self.timeouts.load_s)
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

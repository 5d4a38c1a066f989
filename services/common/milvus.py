"""A Milvus collection over pymilvus' async client: created on first use, reconnected after outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlparse

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

    async def _listening(self) -> bool:
        """A non-blocking TCP probe. pymilvus' client setup blocks the event loop while the server is down
        (stalling every other call of the service, Redis hits included), so it is only tried once the port
        accepts connections."""
        address = urlparse(self.uri if "://" in self.uri else f"http://{self.uri}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address.hostname or "127.0.0.1", address.port or 19530), self.timeout_s)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def connect(self) -> bool:
        """Create the collection if needed and load it; False (retry later) while Milvus is unreachable."""
        if not await self._listening():
            await self.mark_unavailable()
            return False
        try:
            # pymilvus' own reconnect logic can wait without end after a server restart: bound every step here.
            async with asyncio.timeout(self.timeout_s * 10):
                if self._client is None:
                    # Dedicated: pymilvus 3 shares one connection per address between clients, so a "new" client
                    # after a restart got the old, broken one back, and search stayed UNAVAILABLE.
                    self._client = AsyncMilvusClient(uri=self.uri, timeout=self.timeout_s * 4, dedicated=True,
                                                     grpc_options=GRPC_OPTIONS)
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

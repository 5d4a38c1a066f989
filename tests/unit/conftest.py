"""In-process tests: each gets its own current event loop, so objects that bind to one when made (grpc.aio
channels in a ReplicaSet) never depend on what an earlier test left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def own_event_loop() -> Iterator[None]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()

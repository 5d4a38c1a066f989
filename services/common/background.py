"""Fire-and-forget calls that must still finish before the process exits (cache stores, budget charges)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine


class BackgroundCalls:
    def __init__(self) -> None:
        # Holding the tasks keeps them from being garbage-collected mid-flight.
        self._pending: set[asyncio.Task] = set()

    def start(self, coroutine: Coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout_s)

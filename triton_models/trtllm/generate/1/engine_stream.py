"""The engine's responses to one BLS request, read as they come and handed over in batches.

A waiter thread reads the BLS response iterator (it blocks until the engine answers) and passes each response to
the event loop; `ready()` waits for one and returns every response that has arrived by then. When the model keeps
up, that is one response per engine step; when it falls behind (many streams, a fast engine), the tokens that
piled up go out as one delta (the mesh's contract lets a delta span tokens), so the python backend's cost per
response, and each hop's after it, is paid once for all of them. One thread per stream reads to the end, so
python_backend r24.10's rule (every response of a BLS stream must be read, or its iterator's destructor blocks)
holds however the stream ends.

The waiter thread only calls `next()`, as the per-token waits did before: the responses and the iterator are
used and freed on the event loop's thread. Under 256 streams the stub crashed (SIGSEGV) with the per-token
waits, which could free a response in a waiter thread, and with first versions of this reader that freed the
iterator or the responses there; since both are freed on the loop's thread no run has crashed.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

DONE = object()


class EngineStream:
    def __init__(self, responses, loop: asyncio.AbstractEventLoop, waiters: Executor) -> None:
        self._arrived: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        # Held here until the stream is done with, so its last reference goes on the event loop's thread.
        self._responses = responses
        self._read = loop.run_in_executor(waiters, self._pump)

    def _pump(self) -> None:
        put = self._arrived.put_nowait
        try:
            while True:
                # A one-item box: the loop takes the response out of it, so the loop holds its last reference
                # whatever this thread does next.
                box = [next(self._responses, DONE)]
                if box[0] is DONE:
                    break
                self._loop.call_soon_threadsafe(put, box)
        except Exception as exc:  # the iterator failed: the reader raises it in the model's request
            self._loop.call_soon_threadsafe(put, exc)
        finally:
            self._loop.call_soon_threadsafe(put, DONE)

    async def ready(self) -> list:
        """Every response that has arrived, at least one; DONE after the last. A failure of the iterator is raised."""
        batch = [await self._arrived.get()]
        while not self._arrived.empty():
            batch.append(self._arrived.get_nowait())
        for index, item in enumerate(batch):
            if isinstance(item, Exception):
                raise item
            if isinstance(item, list):
                batch[index] = item.pop()
        return batch

    async def finish(self) -> None:
        """Waits until the stream has been read to its end (the rest is dropped), then frees the iterator here, on
        the event loop's thread. Every stream ends with this, however it ended."""
        await self._read
        while not self._arrived.empty():
            item = self._arrived.get_nowait()
            if isinstance(item, list):
                item.pop()
        self._responses = None

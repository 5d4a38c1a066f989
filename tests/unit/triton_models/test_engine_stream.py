"""The BLS model's engine reader (triton_models/trtllm/generate/1/engine_stream.py), without Triton: what arrived
while the model was busy comes as one batch, in order; the end and a failing iterator are seen; the iterator is
read to its end and let go on the event loop's thread."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tools.triton import ROOT

_spec = importlib.util.spec_from_file_location(
    "engine_stream", ROOT / "triton_models" / "trtllm" / "generate" / "1" / "engine_stream.py")
engine_stream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_stream)


class Gated:
    """An engine stream whose responses come out only as the test releases them."""

    def __init__(self, items: list, fail_after: int | None = None) -> None:
        self.items = items
        self.fail_after = fail_after
        self.released = threading.Semaphore(0)
        self.read = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.released.acquire()
        if self.fail_after is not None and self.read == self.fail_after:
            raise RuntimeError("stub went away")
        if self.read == len(self.items):
            raise StopIteration
        self.read += 1
        return self.items[self.read - 1]


async def _settled(stream, gated: Gated, count: int) -> None:
    """Releases `count` items and waits until they are in the stream's hands on the loop (polled: the hand-over
    is a callback from the waiter thread)."""
    queued = stream._arrived.qsize()
    for _ in range(count):
        gated.released.release()
    for _ in range(1000):
        if stream._arrived.qsize() >= queued + count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} responses were not handed over within 5 s")


async def test_responses_that_arrive_meanwhile_come_as_one_batch_in_order():
    gated = Gated(["a", "b", "c", "d"])
    with ThreadPoolExecutor(2) as waiters:
        stream = engine_stream.EngineStream(gated, asyncio.get_running_loop(), waiters)
        await _settled(stream, gated, 1)
        assert await stream.ready() == ["a"]
        await _settled(stream, gated, 3)
        assert await stream.ready() == ["b", "c", "d"]
        gated.released.release()  # the end
        assert await stream.ready() == [engine_stream.DONE]
        await stream.finish()
        assert stream._responses is None, "the iterator is let go here, on the loop's thread"


async def test_a_failing_iterator_raises_in_the_reader_and_the_stream_still_ends():
    gated = Gated(["a"], fail_after=1)
    with ThreadPoolExecutor(2) as waiters:
        stream = engine_stream.EngineStream(gated, asyncio.get_running_loop(), waiters)
        await _settled(stream, gated, 1)
        await _settled(stream, gated, 1)  # the failure, then the end
        with pytest.raises(RuntimeError, match="stub went away"):
            await stream.ready()
        await stream.finish()


async def test_finish_waits_for_the_end_and_drops_what_was_not_read():
    gated = Gated(["a", "b", "c"])
    with ThreadPoolExecutor(2) as waiters:
        stream = engine_stream.EngineStream(gated, asyncio.get_running_loop(), waiters)
        finishing = asyncio.create_task(stream.finish())
        await _settled(stream, gated, 2)
        assert not finishing.done(), "the stream has not ended yet"
        gated.released.release()
        gated.released.release()
        await asyncio.wait_for(finishing, 5)
        assert gated.read == 3 and stream._arrived.empty()

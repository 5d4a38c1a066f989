"""The batch runner (services/gateway/batches/runner.py) on SQLite and a real PostgreSQL: a finalize that takes
long (a large output, slow object storage) does not hold up the renewal of the leases of lines still running, so
no other replica takes them over and runs them a second time; a line runs no later than its batch's expiry."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from sqlalchemy import select

from services.admin import schema
from services.admin.store import AdminStore
from services.gateway.auth import Caller
from services.gateway.batches.jsonl import InputLine
from services.gateway.batches.runner import BatchRunner
from services.gateway.batches.settings import BatchSettings
from services.gateway.batches.storage import LocalDirectory
from services.gateway.batches.store import BatchStore, new_id
from services.gateway.openai_http.batch_lines import LineAnswer

LEASE_S = 0.6


class SlowStorage(LocalDirectory):
    """A directory whose writes wait until the test lets them through: object storage at its slowest."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writing = threading.Event()
        self.gate = threading.Event()

    def put(self, file_id: str, data: bytes) -> None:
        self.writing.set()
        assert self.gate.wait(60), "the test never let the write through"
        super().put(file_id, data)


def _batch(store: BatchStore, text: str, window_s: float = 3600.0) -> str:
    file_id = new_id("file")
    store.add_file(file_id, "acme", "batch", "in.jsonl", 10, 1, max_files=None)
    line = InputLine(1, "only", "/v1/embeddings", "minilm", f'{{"model":"minilm","input":"{text}"}}')
    return store.create_batch("acme", "key_1", "/v1/embeddings", file_id, f"{window_s}s", window_s, {}, [line],
                              max_in_flight=10)["id"]


def _runner(store: BatchStore, storage: LocalDirectory, run_line) -> BatchRunner:
    return BatchRunner(store, storage, BatchSettings(lease_s=LEASE_S, poll_s=0.05, concurrency=2), run_line,
                       lambda tenant, key_id: (Caller(tenant, "standard", key_id=key_id), ""))


async def _run_until_ended(runner: BatchRunner, store: BatchStore, batch_id: str) -> str:
    """Runs the runner until the batch reaches a final status (at most 30 s); that status."""
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(600):
            status = store.batch("acme", batch_id)["status"]
            if status in ("completed", "failed", "expired", "cancelled"):
                return status
            await asyncio.sleep(0.05)
        raise AssertionError("the batch did not end within 30 s")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _lease_until(admin: AdminStore, batch_id: str) -> float | None:
    with admin.engine.connect() as connection:
        return connection.execute(select(schema.batch_lines.c.lease_until).where(
            schema.batch_lines.c.batch_id == batch_id)).scalar_one()


def test_a_slow_finalize_does_not_stop_running_lines_leases_from_being_renewed(url, tmp_path):
    admin = AdminStore.open(url)
    store = BatchStore(admin.engine)
    storage = SlowStorage(tmp_path / "files")
    quick, slow = _batch(store, "quick"), _batch(store, "slow")

    async def scenario() -> list[float]:
        release_line = asyncio.Event()

        async def run_line(caller: Caller, endpoint: str, body: str, timeout_s: float) -> LineAnswer:
            if '"slow"' in body:
                await release_line.wait()
            return LineAnswer(200, {"object": "list", "data": []})

        task = asyncio.create_task(_runner(store, storage, run_line).run())
        try:
            # The quick batch's output is being written, and the write hangs.
            assert await asyncio.to_thread(storage.writing.wait, 30), "the quick batch was never finalized"
            margins = []
            for _ in range(8):  # several lease times while the write hangs
                await asyncio.sleep(LEASE_S / 2)
                margins.append((_lease_until(admin, slow) or 0.0) - time.time())
            storage.gate.set()
            release_line.set()
            for _ in range(600):
                if {store.batch("acme", b)["status"] for b in (quick, slow)} == {"completed"}:
                    return margins
                await asyncio.sleep(0.05)
            raise AssertionError("the batches did not complete once the write went through")
        finally:
            storage.gate.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        margins = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        admin.close()
    assert min(margins) > 0, f"the running line's lease ran out while a finalize wrote: {margins}"


def test_a_line_runs_no_later_than_its_batch_expires(url, tmp_path):
    """A line's deadline is its batch's expiry when that comes before the 300 s line timeout: the router ages a
    batch request in by the time to its deadline, and a line that ran on past the expiry held its batch's
    finalizing back (reported expired only once the line gave up, up to 300 s late)."""
    admin = AdminStore.open(url)
    store = BatchStore(admin.engine)
    window_s = 1.5
    batch_id = _batch(store, "long", window_s=window_s)
    created = time.time()
    deadlines: list[float] = []

    async def run_line(caller: Caller, endpoint: str, body: str, timeout_s: float) -> LineAnswer:
        # A generation that would outlast any deadline: it ends as the mesh ends one, DEADLINE_EXCEEDED.
        deadlines.append(timeout_s)
        await asyncio.sleep(timeout_s)
        return LineAnswer(504, {"error": {"message": "deadline exceeded", "type": "timeout", "param": None,
                                          "code": "deadline_exceeded"}})

    async def scenario() -> float:
        await _run_until_ended(_runner(store, LocalDirectory(tmp_path / "files"), run_line), store, batch_id)
        return time.time() - created

    try:
        ended_after_s = asyncio.run(asyncio.wait_for(scenario(), 30))
        batch = store.batch("acme", batch_id)
        lines = store.ended_lines(batch_id)
    finally:
        admin.close()
    assert deadlines and max(deadlines) <= window_s, f"a line was given more than its batch's window: {deadlines}"
    assert batch["status"] == "expired" and [line["state"] for line in lines] == ["expired"], (batch, lines)
    assert ended_after_s < window_s + 5, f"the batch was finalized {ended_after_s:.1f} s after it was made"


class CountingStore(BatchStore):
    """The real store, recording how often the runner asks it for what."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.claims_wanted: list[int] = []
        self.finalizable_checks = 0

    def claim(self, owner: str, batch_id: str, wanted: int, lease_s: float):
        self.claims_wanted.append(wanted)
        return super().claim(owner, batch_id, wanted, lease_s)

    def to_finalize(self, limit: int = 16) -> list[str]:
        self.finalizable_checks += 1
        return super().to_finalize(limit)


def test_lines_are_claimed_in_groups_and_finalizing_checked_at_the_polls_pace(url, tmp_path):
    """Beside a fast engine a line ends every few milliseconds: claiming one line at each end, and asking for
    finalizable batches each time, was the gateway's largest cost (its statements run in a thread holding the GIL
    against the interactive streams). Claims wait for half the slots; the finalize check keeps the poll's pace."""
    admin = AdminStore.open(url)
    store = CountingStore(admin.engine)
    file_id = new_id("file")
    store.add_file(file_id, "acme", "batch", "in.jsonl", 10, 40, max_files=None)
    lines = [InputLine(i + 1, f"l{i}", "/v1/embeddings", "minilm", f'{{"model":"minilm","input":"t{i}"}}')
             for i in range(40)]
    batch_id = store.create_batch("acme", "key_1", "/v1/embeddings", file_id, "1h", 3600.0, {}, lines,
                                  max_in_flight=10)["id"]
    poll_s = 0.5

    async def run_line(caller: Caller, endpoint: str, body: str, timeout_s: float) -> LineAnswer:
        await asyncio.sleep(0.005 + (hash(body) % 20) / 1000)
        return LineAnswer(200, {"object": "list", "data": []})

    async def scenario() -> float:
        runner = BatchRunner(store, LocalDirectory(tmp_path / "files"),
                             BatchSettings(lease_s=30, poll_s=poll_s, concurrency=4), run_line,
                             lambda tenant, key_id: (Caller(tenant, "standard", key_id=key_id), ""))
        started = time.monotonic()
        assert await _run_until_ended(runner, store, batch_id) == "completed"
        return time.monotonic() - started

    try:
        elapsed_s = asyncio.run(asyncio.wait_for(scenario(), 60))
        counts = store.batch("acme", batch_id)["counts"]
    finally:
        admin.close()
    assert counts == {"total": 40, "completed": 40, "failed": 0}
    assert min(store.claims_wanted) >= 2, f"lines claimed one at a time: {store.claims_wanted}"
    assert store.finalizable_checks <= elapsed_s / poll_s + 2, \
        f"{store.finalizable_checks} finalize checks in {elapsed_s:.1f} s"

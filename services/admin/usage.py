"""Usage records: one per request a gateway answered, written to the admin database in batches so that a request
never waits on the database, and by a process of their own (services/admin/usage_sink.py, the gateway's child):
the inserts' CPU and the GIL they hold stay out of the gateway's event loop, which only encodes a batch a second
and writes it to a pipe.

The queue is bounded (`max_queued`). When it is full, as when the database is down for longer than the queue
lasts, a new record is dropped and counted (mesh_usage_records_dropped_total): the request is served anyway,
the budget service still charged it, only its report row is missing. A clean stop hands everything queued to the
sink and waits for it to be written; a gateway that is killed loses what it had not handed over yet: at most one
flush interval of its records (the sink writes what it was given, then exits at the pipe's end)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, fields

from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, Field

from services.admin import schema
from services.admin.store import AdminStore

log = logging.getLogger(__name__)

RECORDED = Counter("mesh_usage_records_written_total", "Usage records written to the admin database")
DROPPED = Counter("mesh_usage_records_dropped_total",
                  "Usage records dropped because the queue was full (the database too slow or down)")
QUEUED = Gauge("mesh_usage_records_queued", "Usage records waiting to be written")
FLUSH_SECONDS = Histogram("mesh_usage_flush_seconds", "Time to write one batch of usage records",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))


class UsageSettings(BaseModel, extra="forbid"):
    enabled: bool = True
    # The bound on what a killed gateway loses, and how stale a report is at most.
    flush_s: float = Field(1.0, gt=0.0, le=60.0)
    batch_size: int = Field(500, gt=0)
    # ~10,000 records are ~3 MB: minutes of a busy gateway's traffic while the database is away.
    max_queued: int = Field(10_000, gt=0)


@dataclass
class UsageRecord:
    at: float
    tenant: str
    key_id: str
    kind: str              # generate, ask, embed; kserve, kserve-embed (stock Triton clients)
    model: str
    version: str
    pool: str
    request_id: str
    status: str            # a gRPC status name, or CANCELLED
    cache: str             # the CacheStatus name ("" where there is no cache)
    input_tokens: int
    output_tokens: int     # what the client received
    cached_tokens: int     # tokens a cache hit saved (the stored answer's prompt + completion)
    latency_ms: float
    ttft_ms: float | None
    cost_usd: float

    def row(self) -> tuple:
        """The values in COLUMNS' order, cut to the columns' sizes."""
        return (int(self.at // 60), self.at, self.tenant, self.key_id[:40], self.kind, self.model[:128],
                self.version[:64], self.pool[:64], self.request_id[:128], self.status[:32], self.cache[:32],
                self.input_tokens, self.output_tokens, self.cached_tokens, self.latency_ms, self.ttft_ms,
                self.cost_usd)


COLUMNS = ("minute", *(f.name for f in fields(UsageRecord)))


# The sink's database URL travels in its environment, not its command line (where `ps` would show the password).
SINK_URL_ENV = "MESH_USAGE_SINK_URL"


def insert_sql(paramstyle: str) -> str:
    marker = "?" if paramstyle == "qmark" else "%s"
    return (f"INSERT INTO {schema.usage.name} ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join(marker for _ in COLUMNS)})")


class UsageWriter:
    def __init__(self, store: AdminStore | None, settings: UsageSettings) -> None:
        self._store = store
        self._settings = settings
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(settings.max_queued)
        self.enabled = settings.enabled and store is not None
        self._sink: asyncio.subprocess.Process | None = None
        self._acks: asyncio.Task | None = None

    def record(self, record: UsageRecord) -> None:
        """Never blocks: queued, or dropped and counted when the queue is full."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            DROPPED.inc()

    async def run(self) -> None:
        """Hands a batch to the sink every flush interval (sooner when one fills up) until cancelled, then what
        is left, and waits for the sink to have written it."""
        if not self.enabled:
            return
        try:
            while True:
                await self._collect()
                await self._hand_over(self._batch())
        finally:
            await asyncio.shield(self._stop())

    async def _collect(self) -> None:
        deadline = time.monotonic() + self._settings.flush_s
        while self._queue.qsize() < self._settings.batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    def _batch(self) -> list[UsageRecord]:
        batch = [self._queue.get_nowait() for _ in range(min(self._queue.qsize(), self._settings.batch_size))]
        QUEUED.set(self._queue.qsize())
        return batch

    async def _hand_over(self, batch: list[UsageRecord]) -> None:
        if not batch:
            return
        line = json.dumps([r.row() for r in batch], separators=(",", ":")).encode() + b"\n"
        for attempt in range(2):
            try:
                sink = await self._running_sink()
                assert sink.stdin is not None
                sink.stdin.write(line)
                await sink.stdin.drain()
                return
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                # The sink died: a new one takes the batch; if that fails too, the batch is lost and counted.
                log.warning("usage sink gone; starting another", extra={"error": str(exc)[:200], "attempt": attempt})
                self._sink = None
        DROPPED.inc(len(batch))

    async def _running_sink(self) -> asyncio.subprocess.Process:
        if self._sink is not None and self._sink.returncode is None:
            return self._sink
        assert self._store is not None
        env = {**os.environ, SINK_URL_ENV: self._store.engine.url.render_as_string(hide_password=False)}
        self._sink = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.admin.usage_sink", str(self._settings.max_queued),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        self._acks = asyncio.create_task(_acknowledged(self._sink))
        return self._sink

    async def _stop(self) -> None:
        while not self._queue.empty():
            await self._hand_over(self._batch())
        sink, acks = self._sink, self._acks
        if sink is None:
            return
        assert sink.stdin is not None
        sink.stdin.close()
        try:
            await asyncio.wait_for(sink.wait(), timeout=30)
            if acks is not None:
                await acks
        except TimeoutError:
            log.error("usage sink did not finish writing within 30 s; stopped")
            sink.kill()


async def _acknowledged(sink: asyncio.subprocess.Process) -> None:
    """The sink's reports, one line each: "written <records> <seconds>" or "dropped <records>"."""
    assert sink.stdout is not None
    async for line in sink.stdout:
        match line.split():
            case [b"written", count, seconds]:
                RECORDED.inc(int(count))
                FLUSH_SECONDS.observe(float(seconds))
            case [b"dropped", count]:
                DROPPED.inc(int(count))

"""Usage records: one per request a gateway answered, written to the admin database in batches by a background
task so that a request never waits on the database.

The queue is bounded (`max_queued`). When it is full, as when the database is down for longer than the queue
lasts, a new record is dropped and counted (mesh_usage_records_dropped_total): the request is served anyway,
the budget service still charged it, only its report row is missing. A clean stop writes everything queued; a
gateway that is killed loses what it had not written yet: at most one flush interval of its records (and never
more than max_queued)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields

from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

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


def _insert_sql(paramstyle: str) -> str:
    marker = "?" if paramstyle == "qmark" else "%s"
    return (f"INSERT INTO {schema.usage.name} ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join(marker for _ in COLUMNS)})")


class UsageWriter:
    def __init__(self, store: AdminStore | None, settings: UsageSettings) -> None:
        self._store = store
        self._settings = settings
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(settings.max_queued)
        self.enabled = settings.enabled and store is not None

    def record(self, record: UsageRecord) -> None:
        """Never blocks: queued, or dropped and counted when the queue is full."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            DROPPED.inc()

    async def run(self) -> None:
        """Writes a batch every flush interval (sooner when one fills up) until cancelled, then what is left."""
        try:
            while True:
                await self._collect()
                await self.flush()
        finally:
            await asyncio.shield(self.flush(everything=True))

    async def _collect(self) -> None:
        deadline = time.monotonic() + self._settings.flush_s
        while self._queue.qsize() < self._settings.batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    async def flush(self, everything: bool = False) -> int:
        written = 0
        while not self._queue.empty():
            batch = [self._queue.get_nowait()
                     for _ in range(min(self._queue.qsize(), self._settings.batch_size))]
            QUEUED.set(self._queue.qsize())
            try:
                await asyncio.to_thread(self._write, batch)
            except SQLAlchemyError as exc:
                # Queued again at the back (space allowing) for the next flush; what does not fit is lost.
                log.warning("usage records not written; kept for the next flush",
                            extra={"error": str(exc)[:300], "records": len(batch)})
                for record in batch:
                    self.record(record)
                return written
            written += len(batch)
            if not everything:
                break
        return written

    def _write(self, batch: list[UsageRecord]) -> None:
        assert self._store is not None
        started = time.perf_counter()
        engine = self._store.engine
        with engine.begin() as connection:
            # The driver's executemany with positional rows: SQLAlchemy's per-row dict handling cost ~20 us a
            # record, in a thread that shares the GIL with the gateway's event loop. The SQL is fixed text.
            connection.exec_driver_sql(_insert_sql(engine.dialect.paramstyle), [r.row() for r in batch])
        FLUSH_SECONDS.observe(time.perf_counter() - started)
        RECORDED.inc(len(batch))

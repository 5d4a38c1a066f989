"""Every gateway replica runs batch lines in its spare capacity: it claims a few at a time (a lease in the
database, renewed while they run), runs each as its HTTP request would run but at batch priority (the router
serves interactive requests first, and ages batch ones into their turn), writes each result back under its lease,
and finalizes a batch whose lines have all ended (output and error files, the final status). A replica that dies
leaves its lines to whichever replica finds their lease run out; a result is written once, by the lease holder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge

from services.gateway.auth import Caller
from services.gateway.batches.settings import BatchSettings
from services.gateway.batches.storage import FileStorage
from services.gateway.batches.store import BatchStore, Claimed, derived_file_id, request_line_id
from services.gateway.openai_http.batch_lines import TRANSIENT, LineAnswer

log = logging.getLogger(__name__)

LINES = Counter("mesh_batch_lines_total", "Batch lines this replica ran, by outcome", ["outcome"])
RUNNING = Gauge("mesh_batch_lines_running", "Batch lines this replica is running")
FINALIZED = Counter("mesh_batches_finalized_total", "Batches this replica finalized, by final status", ["status"])

# A line that keeps meeting a full budget window or a missing hop is retried this often, then reported failed.
MAX_ATTEMPTS = 8
_ENDED_LINE = {"expired": ("batch_expired", "This request could not be executed before the completion window "
                                            "expired."),
               "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled.")}

LineRunner = Callable[[Caller, str, str, float], Awaitable[LineAnswer]]
CallerFor = Callable[[str, str], tuple[Caller | None, str]]


class BatchRunner:
    def __init__(self, store: BatchStore, files: FileStorage, settings: BatchSettings, run_line: LineRunner,
                 caller_for: CallerFor) -> None:
        self._store = store
        self._files = files
        self._settings = settings
        self._run_line = run_line
        self._caller_for = caller_for
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._running: set[asyncio.Task] = set()
        # Batches this replica is writing the output of, each in its own task: a finalize that takes long (a large
        # output, slow object storage) must not hold up the ticks that renew the running lines' leases.
        self._finalizing: dict[str, asyncio.Task] = {}
        self._renewed = 0.0
        self._finalizable_checked = 0.0
        # Lines are claimed once at least this many slots are free (or none runs): a claim costs its statements
        # and a commit however many lines it takes, run in a thread that holds the GIL against the event loop's
        # interactive streams, and claiming at every line's end was the largest cost in the gateway beside a
        # fast engine (BENCHMARKS.md "Batch inference").
        self._claim_at = max(1, settings.concurrency // 2)
        # Set when a line ends: its slot is claimed again at once rather than at the next poll.
        self._slot_freed = asyncio.Event()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._tick()
                except Exception as exc:  # the database away for a moment: try again next tick
                    log.warning("batch runner tick failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), self._settings.poll_s)
                self._slot_freed.clear()
        finally:
            for task in (*self._running, *self._finalizing.values()):
                task.cancel()
            # Handed back at once rather than when their leases run out: another replica starts them now.
            await asyncio.shield(asyncio.to_thread(self._store.release_all, self.owner))

    async def _tick(self) -> None:
        now = time.monotonic()
        if self._running and now - self._renewed >= self._settings.lease_s / 3:
            await asyncio.to_thread(self._store.renew, self.owner, self._settings.lease_s)
            self._renewed = now
        free = self._settings.concurrency - len(self._running)
        if free >= self._claim_at or (free > 0 and not self._running):
            for claimed in await asyncio.to_thread(self._claim, free):
                task = asyncio.create_task(self._line(claimed))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            RUNNING.set(len(self._running))
        # At the poll's pace, not at every line's end: a batch waits at most poll_s longer to be finalized.
        if now - self._finalizable_checked < self._settings.poll_s:
            return
        self._finalizable_checked = now
        for batch_id in await asyncio.to_thread(self._store.to_finalize):
            if batch_id not in self._finalizing:
                task = asyncio.create_task(asyncio.to_thread(self._finalize, batch_id))
                self._finalizing[batch_id] = task
                task.add_done_callback(lambda done, b=batch_id: self._finalized(b, done))

    def _finalized(self, batch_id: str, task: asyncio.Task) -> None:
        del self._finalizing[batch_id]
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # Its hold runs out and a replica (this one, next tick) finalizes it again.
            log.warning("batch finalize failed", extra={"batch": batch_id,
                                                        "error": f"{type(error).__name__}: {error}"[:300]})

    def _claim(self, free: int) -> list[Claimed]:
        """A share of the free slots for each batch with work, oldest first: one tenant's large batch does not
        keep another's from starting (the router's fair queues then weigh the tenants)."""
        batches = self._store.runnable_batches()
        claimed: list[Claimed] = []
        for batch_id in batches:
            wanted = min(free - len(claimed), math.ceil(free / len(batches)))
            if wanted <= 0:
                break
            claimed += self._store.claim(self.owner, batch_id, wanted, self._settings.lease_s)
        if claimed:
            self._renewed = time.monotonic()
        return claimed

    async def _line(self, line: Claimed) -> None:
        try:
            caller, why = self._caller_for(line.tenant, line.key_id)
            if caller is None:
                answer = LineAnswer(401, {"error": {"message": why, "type": "authentication_error", "param": None,
                                                    "code": "invalid_api_key"}})
            else:
                # The batch's expiry is the line's deadline when it comes first: the router ages a batch request
                # in by its time to its deadline, and a line still running at the expiry would hold the batch's
                # finalizing back by up to the line timeout.
                timeout_s = min(self._settings.line_timeout_s, line.expires_at - time.time())
                answer = await self._run_line(caller, line.endpoint, line.body, timeout_s)
            past_window = time.time() >= line.expires_at
            if answer.status_code in TRANSIENT and (line.attempts < MAX_ATTEMPTS or past_window):
                # Past the window, pending again is what lets the finalize report the line batch_expired.
                # Backs off (1, 2, 4 ... s, at most 30) in the line's own not-before, not in this task.
                later = time.time() + min(30.0, 2.0 ** (line.attempts - 1))
                await asyncio.to_thread(self._store.release, self.owner, line.batch_id, line.line, later)
                LINES.labels("retried").inc()
                return
            state = "done" if answer.status_code == 200 else "failed"
            written = await asyncio.to_thread(self._store.finish, self.owner, line.batch_id, line.line, state,
                                              answer.status_code, answer.body, answer.request_id)
            LINES.labels(state if written else "lease_lost").inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("batch line failed inside the mesh", exc_info=exc,
                      extra={"batch": line.batch_id, "line": line.line})
            await asyncio.to_thread(self._store.release, self.owner, line.batch_id, line.line, time.time() + 5)
        finally:
            RUNNING.set(len(self._running) - 1)
            self._slot_freed.set()

    def _finalize(self, batch_id: str) -> None:
        if not self._store.begin_finalizing(self.owner, batch_id, hold_s=max(30.0, self._settings.lease_s)):
            return
        output: list[bytes] = []
        errors: list[bytes] = []
        for row in self._store.ended_lines(batch_id):
            entry: dict = {"id": request_line_id(batch_id, row["line"]), "custom_id": row["custom_id"]}
            if row["state"] in _ENDED_LINE:
                code, message = _ENDED_LINE[row["state"]]
                entry |= {"response": None, "error": {"code": code, "message": message}}
            else:
                entry |= {"response": {"status_code": row["status_code"], "request_id": row["request_id"] or "",
                                       "body": json.loads(row["result"])}, "error": None}
            encoded = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            (output if row["state"] == "done" else errors).append(encoded)
        outputs: dict[str, tuple[str, int, int]] = {}
        for kind, lines in (("output", output), ("error", errors)):
            if lines:
                file_id = derived_file_id(batch_id, kind)
                data = b"".join(lines)
                self._files.put(file_id, data)
                outputs[kind] = (file_id, len(data), len(lines))
        if self._store.finish_batch(self.owner, batch_id, outputs):
            batch = self._store.batch_status(batch_id)
            FINALIZED.labels(batch).inc()
            log.info("batch finalized", extra={"batch": batch_id, "status": batch, "output_lines": len(output),
                                               "error_lines": len(errors)})

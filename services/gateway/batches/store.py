"""Files, batches and batch lines in the mesh's database (tables: services/admin/schema.py). Every read is by the
caller's tenant as well as the id: another tenant's id is not found, never refused as someone else's.

A line is claimed by a conditional UPDATE (pending, or running under a lease that ran out) and written back by
an UPDATE conditional on the claimant still holding it: a replica that lost its lease (it stalled, another
took the line over) cannot write a second result. The same in SQLite and PostgreSQL, no row locks held across
a model call."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, and_, func, insert, or_, select, update

from services.admin import schema
from services.gateway.batches.jsonl import InputLine

# Where a batch is still to be worked on; the rest are final.
LIVE = ("validating", "in_progress", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
# A line that went to a model at least once and is not done ("failed" has a status code of its own).
_T = schema.batch_lines


class Refused(ValueError):
    """A request the store refused (a limit, a state): the message says why, for the caller."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}" if prefix == "file" else f"{prefix}_{secrets.token_hex(12)}"


def derived_file_id(batch_id: str, kind: str) -> str:
    """A batch's output (or error) file id, the same whichever replica finalizes it, however many times."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def request_line_id(batch_id: str, line: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Claimed:
    batch_id: str
    line: int
    custom_id: str
    body: str
    endpoint: str
    tenant: str
    key_id: str
    attempts: int
    # The batch's completion window ends here (wall-clock seconds): no line of it may run past it.
    expires_at: float


class BatchStore:
    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    # --- files -----------------------------------------------------------------------------------------
    def add_file(self, file_id: str, tenant: str, purpose: str, filename: str, size: int, lines: int,
                 max_files: int | None) -> dict:
        with self._engine.begin() as connection:
            if max_files is not None:
                held = connection.execute(select(func.count()).select_from(schema.files).where(
                    schema.files.c.tenant == tenant, schema.files.c.purpose == purpose,
                    schema.files.c.deleted_at.is_(None))).scalar_one()
                if held >= max_files:
                    raise Refused(f"this tenant holds {held} files, the most its tier may keep: delete one "
                                  "(DELETE /v1/files/{id}) first")
            row = {"id": file_id, "tenant": tenant, "purpose": purpose, "filename": filename, "bytes": size,
                   "lines": lines, "created_at": self._clock(), "deleted_at": None}
            connection.execute(insert(schema.files).values(**row))
        return row

    def file(self, tenant: str, file_id: str) -> dict | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(schema.files).where(
                schema.files.c.id == file_id, schema.files.c.tenant == tenant,
                schema.files.c.deleted_at.is_(None))).mappings().first()
        return dict(row) if row else None

    def files(self, tenant: str, purpose: str | None, limit: int, after: str | None) -> tuple[list[dict], bool]:
        return self._page(schema.files, tenant, limit, after, [schema.files.c.deleted_at.is_(None)] +
                          ([schema.files.c.purpose == purpose] if purpose else []))

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self._engine.begin() as connection:
            return connection.execute(update(schema.files).where(
                schema.files.c.id == file_id, schema.files.c.tenant == tenant,
                schema.files.c.deleted_at.is_(None)).values(deleted_at=self._clock())).rowcount == 1

    # --- batches ---------------------------------------------------------------------------------------
    def create_batch(self, tenant: str, key_id: str, endpoint: str, input_file_id: str, window: str,
                     window_s: float, metadata: dict[str, str], lines: list[InputLine],
                     max_in_flight: int) -> dict:
        now = self._clock()
        batch_id = new_id("batch")
        with self._engine.begin() as connection:
            live = connection.execute(select(func.count()).select_from(schema.batches).where(
                schema.batches.c.tenant == tenant, schema.batches.c.status.in_((*LIVE, "finalizing")))).scalar_one()
            if live >= max_in_flight:
                raise Refused(f"this tenant has {live} batches in flight, the most its tier may run: wait for one to "
                              "finish or cancel one")
            connection.execute(insert(schema.batches).values(
                id=batch_id, tenant=tenant, key_id=key_id, endpoint=endpoint, input_file_id=input_file_id,
                completion_window=window, status="validating", created_at=now, expires_at=now + window_s,
                total=len(lines), metadata=json.dumps(metadata, sort_keys=True)))
            connection.execute(insert(_T), [
                {"batch_id": batch_id, "line": line.number, "custom_id": line.custom_id, "body": line.body,
                 "state": "pending", "attempts": 0} for line in lines])
        return self._batch_by_id(batch_id)

    def batch(self, tenant: str, batch_id: str) -> dict | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(schema.batches).where(
                schema.batches.c.id == batch_id, schema.batches.c.tenant == tenant)).mappings().first()
            return self._with_counts(connection, dict(row)) if row else None

    def _batch_by_id(self, batch_id: str) -> dict:
        with self._engine.connect() as connection:
            row = connection.execute(select(schema.batches).where(schema.batches.c.id == batch_id)).mappings().one()
            return self._with_counts(connection, dict(row))

    def batches(self, tenant: str, limit: int, after: str | None) -> tuple[list[dict], bool]:
        rows, more = self._page(schema.batches, tenant, limit, after, [])
        with self._engine.connect() as connection:
            return [self._with_counts(connection, row) for row in rows], more

    def cancel(self, tenant: str, batch_id: str) -> dict | None:
        with self._engine.begin() as connection:
            connection.execute(update(schema.batches).where(
                schema.batches.c.id == batch_id, schema.batches.c.tenant == tenant,
                schema.batches.c.status.in_(("validating", "in_progress"))).values(
                status="cancelling", cancelling_at=self._clock()))
        return self.batch(tenant, batch_id)

    @staticmethod
    def _with_counts(connection, row: dict) -> dict:
        counts = dict(connection.execute(select(_T.c.state, func.count()).where(
            _T.c.batch_id == row["id"]).group_by(_T.c.state)).all())
        row["counts"] = {"total": row["total"], "completed": counts.get("done", 0),
                         "failed": counts.get("failed", 0) + counts.get("expired", 0)}
        return row

    def _page(self, table, tenant: str, limit: int, after: str | None, where: list) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them; `after` is the last id of the previous page."""
        conditions = [table.c.tenant == tenant, *where]
        with self._engine.connect() as connection:
            if after:
                anchor = connection.execute(select(table.c.created_at, table.c.id).where(
                    table.c.id == after, table.c.tenant == tenant)).first()
                if anchor is None:
                    raise Refused(f"after={after[:60]!r} is not an id of this list")
                conditions.append(or_(table.c.created_at < anchor.created_at,
                                      and_(table.c.created_at == anchor.created_at, table.c.id < anchor.id)))
            rows = connection.execute(select(table).where(*conditions).order_by(
                table.c.created_at.desc(), table.c.id.desc()).limit(limit + 1)).mappings().all()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    # --- the runners' side -----------------------------------------------------------------------------
    def runnable_batches(self, limit: int = 64) -> list[str]:
        """Batches with lines to claim, oldest first."""
        now = self._clock()
        with self._engine.connect() as connection:
            return list(connection.execute(select(schema.batches.c.id).where(
                schema.batches.c.status.in_(("validating", "in_progress")),
                schema.batches.c.expires_at > now).order_by(schema.batches.c.created_at).limit(limit)).scalars())

    def claim(self, owner: str, batch_id: str, wanted: int, lease_s: float) -> list[Claimed]:
        now = self._clock()
        claimable = or_(and_(_T.c.state == "pending", or_(_T.c.lease_until.is_(None), _T.c.lease_until < now)),
                        and_(_T.c.state == "running", _T.c.lease_until < now))
        claimed: list[Claimed] = []
        with self._engine.begin() as connection:
            batch = connection.execute(select(schema.batches).where(
                schema.batches.c.id == batch_id, schema.batches.c.status.in_(("validating", "in_progress")),
                schema.batches.c.expires_at > now)).mappings().first()
            if batch is None:
                return []
            candidates = connection.execute(select(_T.c.line, _T.c.custom_id, _T.c.body, _T.c.attempts).where(
                _T.c.batch_id == batch_id, claimable).order_by(_T.c.line).limit(wanted)).all()
            for line, custom_id, body, attempts in candidates:
                taken = connection.execute(update(_T).where(_T.c.batch_id == batch_id, _T.c.line == line, claimable)
                                           .values(state="running", owner=owner, lease_until=now + lease_s,
                                                   attempts=attempts + 1)).rowcount
                if taken:
                    claimed.append(Claimed(batch_id, line, custom_id, body, batch["endpoint"], batch["tenant"],
                                           batch["key_id"], attempts + 1, batch["expires_at"]))
            if claimed and batch["status"] == "validating":
                connection.execute(update(schema.batches).where(
                    schema.batches.c.id == batch_id, schema.batches.c.status == "validating").values(
                    status="in_progress", in_progress_at=now))
        return claimed

    def renew(self, owner: str, lease_s: float) -> int:
        """Every line this replica runs keeps its lease: it is alive."""
        with self._engine.begin() as connection:
            return connection.execute(update(_T).where(_T.c.owner == owner, _T.c.state == "running").values(
                lease_until=self._clock() + lease_s)).rowcount

    def finish(self, owner: str, batch_id: str, line: int, state: str, status_code: int, result: dict,
               request_id: str) -> bool:
        """The line's one result; False when this replica no longer holds it (the result is dropped)."""
        with self._engine.begin() as connection:
            return connection.execute(update(_T).where(
                _T.c.batch_id == batch_id, _T.c.line == line, _T.c.owner == owner, _T.c.state == "running").values(
                state=state, status_code=status_code, result=json.dumps(result, ensure_ascii=False),
                request_id=request_id[:128], finished_at=self._clock(), owner=None, lease_until=None)).rowcount == 1

    def release(self, owner: str, batch_id: str, line: int, not_before: float) -> bool:
        """Back to pending (a transient failure: capacity, a budget window): run again after `not_before`."""
        with self._engine.begin() as connection:
            return connection.execute(update(_T).where(
                _T.c.batch_id == batch_id, _T.c.line == line, _T.c.owner == owner, _T.c.state == "running").values(
                state="pending", owner=None, lease_until=not_before)).rowcount == 1

    def to_finalize(self, limit: int = 16) -> list[str]:
        """Batches whose lines are all ended, or that were cancelled or ran past their window, or whose
        finalizer died."""
        now = self._clock()
        open_lines = select(_T.c.batch_id).where(_T.c.batch_id == schema.batches.c.id,
                                                 _T.c.state.in_(("pending", "running"))).exists()
        with self._engine.connect() as connection:
            return list(connection.execute(select(schema.batches.c.id).where(or_(
                and_(schema.batches.c.status.in_(LIVE), or_(~open_lines, schema.batches.c.status == "cancelling",
                                                          schema.batches.c.expires_at <= now)),
                and_(schema.batches.c.status == "finalizing", schema.batches.c.finalizer_until < now),
            )).order_by(schema.batches.c.created_at).limit(limit)).scalars())

    def begin_finalizing(self, owner: str, batch_id: str, hold_s: float) -> bool:
        """Takes the batch for finalizing when nothing of it runs any more: lines not started are ended as
        cancelled (a cancel) or expired (past the window). False: not now (lines still run, or another replica
        finalizes it)."""
        now = self._clock()
        with self._engine.begin() as connection:
            batch = connection.execute(select(schema.batches).where(schema.batches.c.id == batch_id)).mappings().one()
            if batch["status"] in FINAL or (batch["finalizer"] and (batch["finalizer_until"] or 0) >= now):
                return False
            if batch["status"] != "finalizing":
                ending = "cancelled" if batch["status"] == "cancelling" else \
                    "expired" if batch["expires_at"] <= now else None
                if ending is not None:
                    connection.execute(update(_T).where(_T.c.batch_id == batch_id, or_(
                        _T.c.state == "pending", and_(_T.c.state == "running", _T.c.lease_until < now))).values(
                        state=ending, owner=None, lease_until=None, finished_at=now))
                running = connection.execute(select(func.count()).select_from(_T).where(
                    _T.c.batch_id == batch_id, _T.c.state.in_(("pending", "running")))).scalar_one()
                if running:
                    return False
            return connection.execute(update(schema.batches).where(
                schema.batches.c.id == batch_id, schema.batches.c.status == batch["status"],
                or_(schema.batches.c.finalizer.is_(None), schema.batches.c.finalizer_until < now)).values(
                status="finalizing", finalizing_at=batch["finalizing_at"] or now, finalizer=owner,
                finalizer_until=now + hold_s)).rowcount == 1

    def ended_lines(self, batch_id: str) -> list[dict]:
        with self._engine.connect() as connection:
            return [dict(r) for r in connection.execute(select(
                _T.c.line, _T.c.custom_id, _T.c.state, _T.c.status_code, _T.c.result, _T.c.request_id).where(
                _T.c.batch_id == batch_id).order_by(_T.c.line)).mappings()]

    def finish_batch(self, owner: str, batch_id: str, outputs: dict[str, tuple[str, int, int]]) -> bool:
        """The output and error files' rows, and the batch's final status. outputs: kind -> (file id, bytes,
        lines)."""
        now = self._clock()
        with self._engine.begin() as connection:
            batch = connection.execute(select(schema.batches).where(
                schema.batches.c.id == batch_id, schema.batches.c.status == "finalizing",
                schema.batches.c.finalizer == owner)).mappings().first()
            if batch is None:
                return False
            for kind, (file_id, size, lines) in outputs.items():
                if connection.execute(select(schema.files.c.id).where(schema.files.c.id == file_id)).first() is None:
                    connection.execute(insert(schema.files).values(
                        id=file_id, tenant=batch["tenant"], purpose="batch_output",
                        filename=f"{batch_id}_{kind}.jsonl", bytes=size, lines=lines, created_at=now))
            ended = dict(connection.execute(select(_T.c.state, func.count()).where(
                _T.c.batch_id == batch_id).group_by(_T.c.state)).all())
            status = "cancelled" if batch["cancelling_at"] else "expired" if ended.get("expired") else "completed"
            connection.execute(update(schema.batches).where(schema.batches.c.id == batch_id).values(
                status=status, **{f"{status}_at": now}, finalizer=None, finalizer_until=None,
                output_file_id=outputs["output"][0] if "output" in outputs else None,
                error_file_id=outputs["error"][0] if "error" in outputs else None))
        return True

    def batch_status(self, batch_id: str) -> str:
        with self._engine.connect() as connection:
            return connection.execute(select(schema.batches.c.status).where(
                schema.batches.c.id == batch_id)).scalar_one()

    def release_all(self, owner: str) -> int:
        """A replica stopping cleanly hands back what it was running: pending again, at once, and the attempt its
        claim counted is not held against the line (a line caught in many rolling restarts is not failed)."""
        with self._engine.begin() as connection:
            return connection.execute(update(_T).where(_T.c.owner == owner, _T.c.state == "running").values(
                state="pending", owner=None, lease_until=None, attempts=_T.c.attempts - 1)).rowcount

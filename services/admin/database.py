"""One engine per database URL: SQLite (the local default) or PostgreSQL, with what each needs to be safe for
several processes at once."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SUPPORTED = ("sqlite", "postgresql")
BUSY_TIMEOUT_S = 10.0


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """Readers (the replicas' polls) never wait for a writer in WAL mode. SQLite answers "database is locked" at
    once, without its busy handler, to a connection that switches a new file to WAL while another one does the
    same (replicas starting together on one database, as `make up`'s gateways do): asked again it finds the file
    switched, so it asks again for as long as the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def admin_engine(url: str) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED:
        raise ValueError(f"the admin database must be sqlite:///<file> or postgresql+psycopg://..., not {backend!r}")
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=2)
    engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would begin only at the first write, so two replicas could read
        # the same state and both write; SQLAlchemy's begin (below) takes the write lock at once instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")  # first: the switch may wait
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine

"""The usage sink: a gateway's child process that writes the usage records its parent hands it (one JSON line per
batch on stdin, the rows in usage.COLUMNS' order) and reports each write on stdout ("written <n> <seconds>",
"dropped <n>"). A batch the database refused is kept and tried again before the next one, up to `max_kept`
records (beyond: dropped and reported); at the end of its input (the gateway stopped, or died) it writes what it
holds, tries once more what was refused, and exits.

    MESH_USAGE_SINK_URL=<database url> python -m services.admin.usage_sink <max_kept>
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.admin.database import admin_engine
from services.admin.usage import SINK_URL_ENV, insert_sql


def _report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _write(engine: Engine, sql: str, rows: list[list]) -> bool:
    started = time.perf_counter()
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(sql, [tuple(row) for row in rows])
    except SQLAlchemyError as exc:
        sys.stderr.write(f"usage records not written, kept for the next batch: {str(exc)[:300]}\n")
        return False
    _report(f"written {len(rows)} {time.perf_counter() - started:.6f}")
    return True


def main() -> None:
    # A stop signal sent to the gateway's whole process group (Ctrl-C, a supervisor's killpg) must not end the sink
    # before its parent handed over the rest: it ends at the end of its input, which the parent closes when done.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    max_kept = int(sys.argv[1])
    engine = admin_engine(os.environ[SINK_URL_ENV])
    sql = insert_sql(engine.dialect.paramstyle)
    kept: list[list] = []
    for line in sys.stdin.buffer:
        rows = json.loads(line)
        if kept and _write(engine, sql, kept):
            kept = []
        if not _write(engine, sql, rows):
            kept += rows
            if len(kept) > max_kept:
                _report(f"dropped {len(kept) - max_kept}")
                kept = kept[len(kept) - max_kept:]
    if kept and not _write(engine, sql, kept):
        _report(f"dropped {len(kept)}")
    engine.dispose()


if __name__ == "__main__":
    main()

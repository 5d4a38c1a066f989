"""The SQLite admin database under replicas that start together: each connection switches a new file to WAL, and
SQLite refuses one of two simultaneous switches at once ("database is locked") without waiting its busy timeout;
a replica must not fail its start for that."""

from __future__ import annotations

import threading

from sqlalchemy import Engine, text

from services.admin.database import admin_engine

REPLICAS = 8


def _connect_together(engines: list[Engine]) -> list[str]:
    """Every engine connects at the same moment; what each failure said."""
    together = threading.Barrier(len(engines))
    failures: list[str] = []

    def connect(engine: Engine) -> None:
        together.wait()
        try:
            with engine.connect() as connection:
                assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        except Exception as exc:  # collected: an assert in a thread would not fail the test
            failures.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=connect, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return failures


def test_replicas_that_open_a_new_database_at_the_same_moment_all_connect(tmp_path):
    # Before the switch was retried, about one round in sixteen here had a connection refused: 200 rounds fail
    # that code all but certainly.
    failures: list[str] = []
    for round_ in range(200):
        engines = [admin_engine(f"sqlite:///{tmp_path}/admin-{round_}.sqlite3") for _ in range(REPLICAS)]
        failures += [f"round {round_}: {failure}" for failure in _connect_together(engines)]
        for engine in engines:
            engine.dispose()
    assert failures == []

"""Fixtures of the integration tests: the mesh's database on both of its backends, a fresh SQLite file or a fresh
database on a real PostgreSQL server (one server per test module that asks for it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from services.admin.database import admin_engine
from tools.postgres import PostgresServer, start_postgres


@pytest.fixture(scope="module")
def postgres(tmp_path_factory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres") / "postgres.log")
    yield server
    server.stop()


_databases = iter(range(1000))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'admin.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"test_{next(_databases)}"
    engine = admin_engine(server.url.rsplit("/", 1)[0] + "/postgres")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{name}"

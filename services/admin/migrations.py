"""The mesh database's schema, one forward-only step per version, applied in order at start-up by whichever
replica comes first (PostgreSQL: under an advisory lock; SQLite: the write lock every transaction of the store
takes at its start, database.py), recorded in
mesh_schema_versions. A released step is never edited: a change is a new step. The DDL is the subset SQLite and
PostgreSQL share, so one list serves both."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tiers, tenants, api keys, revision", (
        """CREATE TABLE mesh_tiers (
            name VARCHAR(64) PRIMARY KEY,
            requests_per_minute INTEGER NOT NULL,
            burst INTEGER NOT NULL,
            tokens_per_minute BIGINT NOT NULL,
            tokens_per_month BIGINT NOT NULL,
            share_weight DOUBLE PRECISION NOT NULL,
            max_stored_vectors BIGINT NOT NULL)""",
        """CREATE TABLE mesh_tenants (
            id VARCHAR(64) PRIMARY KEY,
            tier VARCHAR(64) NOT NULL REFERENCES mesh_tiers(name),
            suspended BOOLEAN NOT NULL,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE mesh_api_keys (
            id VARCHAR(40) PRIMARY KEY,
            tenant VARCHAR(64) NOT NULL REFERENCES mesh_tenants(id),
            prefix VARCHAR(16) NOT NULL,
            sha256 VARCHAR(64) NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION,
            allowed_models TEXT NOT NULL,
            labels TEXT NOT NULL)""",
        "CREATE INDEX mesh_api_keys_tenant ON mesh_api_keys (tenant)",
        "CREATE INDEX mesh_api_keys_prefix ON mesh_api_keys (prefix)",
        "CREATE TABLE mesh_revision (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO mesh_revision (id, value) VALUES (1, 1)",
    )),
    Migration(2, "usage records", (
        # One row per request a gateway answered (services/admin/usage.py). `minute` is the request's end in
        # whole minutes since the epoch: reports bucket on it with integer division, the same in both databases.
        # Append-only and never addressed one by one: no key to generate in two dialects.
        """CREATE TABLE mesh_usage (
            minute BIGINT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            tenant VARCHAR(64) NOT NULL,
            key_id VARCHAR(40) NOT NULL,
            kind VARCHAR(16) NOT NULL,
            model VARCHAR(128) NOT NULL,
            version VARCHAR(64) NOT NULL,
            pool VARCHAR(64) NOT NULL,
            request_id VARCHAR(128) NOT NULL,
            status VARCHAR(32) NOT NULL,
            cache VARCHAR(32) NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL,
            ttft_ms DOUBLE PRECISION,
            cost_usd DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX mesh_usage_minute ON mesh_usage (minute)",
        "CREATE INDEX mesh_usage_tenant_minute ON mesh_usage (tenant, minute)",
    )),
    Migration(3, "a key's own limits", (
        # NULL: the tenant's tier alone limits the key.
        "ALTER TABLE mesh_api_keys ADD COLUMN requests_per_minute INTEGER",
        "ALTER TABLE mesh_api_keys ADD COLUMN burst INTEGER",
        "ALTER TABLE mesh_api_keys ADD COLUMN tokens_per_minute BIGINT",
        "ALTER TABLE mesh_api_keys ADD COLUMN tokens_per_month BIGINT",
    )),
    Migration(4, "files and batches", (
        # OpenAI's Files and Batches API (services/gateway/batches): a file's bytes are in object storage, its
        # row says whose it is; a batch's lines are rows, claimed by any gateway under a lease and written back
        # by the lease's holder only, so that each line has one result however many replicas died on it.
        """CREATE TABLE mesh_files (
            id VARCHAR(40) PRIMARY KEY,
            tenant VARCHAR(64) NOT NULL,
            purpose VARCHAR(32) NOT NULL,
            filename VARCHAR(256) NOT NULL,
            bytes BIGINT NOT NULL,
            lines INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            deleted_at DOUBLE PRECISION)""",
        "CREATE INDEX mesh_files_tenant ON mesh_files (tenant, created_at)",
        """CREATE TABLE mesh_batches (
            id VARCHAR(40) PRIMARY KEY,
            tenant VARCHAR(64) NOT NULL,
            key_id VARCHAR(40) NOT NULL,
            endpoint VARCHAR(64) NOT NULL,
            input_file_id VARCHAR(40) NOT NULL,
            completion_window VARCHAR(16) NOT NULL,
            status VARCHAR(16) NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            in_progress_at DOUBLE PRECISION,
            finalizing_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            failed_at DOUBLE PRECISION,
            expired_at DOUBLE PRECISION,
            cancelling_at DOUBLE PRECISION,
            cancelled_at DOUBLE PRECISION,
            output_file_id VARCHAR(40),
            error_file_id VARCHAR(40),
            total INTEGER NOT NULL,
            metadata TEXT NOT NULL,
            finalizer VARCHAR(64),
            finalizer_until DOUBLE PRECISION)""",
        "CREATE INDEX mesh_batches_tenant ON mesh_batches (tenant, created_at)",
        "CREATE INDEX mesh_batches_status ON mesh_batches (status)",
        """CREATE TABLE mesh_batch_lines (
            batch_id VARCHAR(40) NOT NULL,
            line INTEGER NOT NULL,
            custom_id VARCHAR(512) NOT NULL,
            body TEXT NOT NULL,
            state VARCHAR(16) NOT NULL,
            owner VARCHAR(64),
            lease_until DOUBLE PRECISION,
            attempts INTEGER NOT NULL,
            status_code INTEGER,
            result TEXT,
            request_id VARCHAR(128),
            finished_at DOUBLE PRECISION,
            PRIMARY KEY (batch_id, line))""",
        "CREATE INDEX mesh_batch_lines_state ON mesh_batch_lines (batch_id, state)",
    )),
    Migration(5, "a tier's batch discount and batch limits", (
        # 0 for the tiers already there: full price, and the deployment's limits, as before this step.
        "ALTER TABLE mesh_tiers ADD COLUMN batch_discount DOUBLE PRECISION NOT NULL DEFAULT 0",
        "ALTER TABLE mesh_tiers ADD COLUMN max_batch_files INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE mesh_tiers ADD COLUMN max_batches_in_flight INTEGER NOT NULL DEFAULT 0",
    )),
)

_VERSIONS_TABLE = """CREATE TABLE IF NOT EXISTS mesh_schema_versions (
    version INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"""
# Any constant works: it only has to be the same in every replica of the mesh.
_PG_LOCK_ID = 0x6D657368


def current_version(connection: Connection) -> int:
    return connection.execute(text("SELECT COALESCE(MAX(version), 0) FROM mesh_schema_versions")).scalar_one()


def migrate(engine: Engine) -> list[int]:
    """Brings the schema up to the last step; the versions it applied (none when already there)."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        connection.execute(text(_VERSIONS_TABLE))
        have = current_version(connection)
        latest = MIGRATIONS[-1].version
        if have > latest:
            raise RuntimeError(f"the admin database is at schema version {have}, newer than this code knows "
                               f"({latest}): run the newer release, or restore a matching backup")
        applied = []
        for step in MIGRATIONS:
            if step.version <= have:
                continue
            for statement in step.statements:
                connection.execute(text(statement))
            connection.execute(text("INSERT INTO mesh_schema_versions (version, name, applied_at) "
                                    "VALUES (:v, :n, :t)"), {"v": step.version, "n": step.name, "t": time.time()})
            applied.append(step.version)
        return applied

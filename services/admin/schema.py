"""The admin database's tables as the store queries them (their DDL, version by version, is migrations.py)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, Integer, MetaData, String, Table, Text

metadata = MetaData()

tiers = Table(
    "mesh_tiers", metadata,
    Column("name", String(64), primary_key=True),
    Column("requests_per_minute", Integer, nullable=False),
    Column("burst", Integer, nullable=False),
    Column("tokens_per_minute", BigInteger, nullable=False),
    Column("tokens_per_month", BigInteger, nullable=False),
    Column("share_weight", Float, nullable=False),
    Column("max_stored_vectors", BigInteger, nullable=False),
    Column("batch_discount", Float, nullable=False),
    Column("max_batch_files", Integer, nullable=False),
    Column("max_batches_in_flight", Integer, nullable=False),
)

tenants = Table(
    "mesh_tenants", metadata,
    Column("id", String(64), primary_key=True),
    Column("tier", String(64), nullable=False),
    Column("suspended", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
)

api_keys = Table(
    "mesh_api_keys", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("allowed_models", Text, nullable=False),  # a JSON list
    Column("labels", Text, nullable=False),          # a JSON object
    Column("requests_per_minute", Integer),          # the key's own limit, under its tier's; NULL: none
    Column("burst", Integer),
    Column("tokens_per_minute", BigInteger),         # the key's own token windows, under its tier's; NULL: none
    Column("tokens_per_month", BigInteger),
)

# One row: bumped by every change, so a replica's poll is one indexed read, not a table scan.
revision = Table(
    "mesh_revision", metadata,
    Column("id", Integer, primary_key=True),
    Column("value", BigInteger, nullable=False),
)

usage = Table(
    "mesh_usage", metadata,
    Column("minute", BigInteger, nullable=False),
    Column("at", Float, nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("pool", String(64), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("cache", String(32), nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("cost_usd", Float, nullable=False),
)

files = Table(
    "mesh_files", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("purpose", String(32), nullable=False),   # batch (uploaded), batch_output (a batch's output or errors)
    Column("filename", String(256), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("lines", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("deleted_at", Float),
)

batches = Table(
    "mesh_batches", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("failed_at", Float),
    Column("expired_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Column("output_file_id", String(40)),
    Column("error_file_id", String(40)),
    Column("total", Integer, nullable=False),
    Column("metadata", Text, nullable=False),       # a JSON object
    Column("finalizer", String(64)),                # the replica writing the output files, until finalizer_until
    Column("finalizer_until", Float),
)

batch_lines = Table(
    "mesh_batch_lines", metadata,
    Column("batch_id", String(40), primary_key=True),
    Column("line", Integer, primary_key=True),
    Column("custom_id", String(512), nullable=False),
    Column("body", Text, nullable=False),           # the request's JSON body
    Column("state", String(16), nullable=False),    # pending, running, done, failed, expired, cancelled
    Column("owner", String(64)),                    # the replica holding the lease, until lease_until
    Column("lease_until", Float),
    Column("attempts", Integer, nullable=False),
    Column("status_code", Integer),
    Column("result", Text),                         # the response body (or error) as JSON
    Column("request_id", String(128)),
    Column("finished_at", Float),
)

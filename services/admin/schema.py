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

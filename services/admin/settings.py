"""Where a replica finds the admin database and how often it looks for changes (one typed place, nested in the
gateway's and the rate-limit service's settings: MESH_GATEWAY_ADMIN__URL, MESH_RATELIMIT_ADMIN__POLL_S, ...)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AdminDatabase(BaseModel, extra="forbid"):
    # SQLite for one machine (`make up`: sqlite:///run/admin.sqlite3); PostgreSQL wherever replicas run on
    # several (postgresql+psycopg://user:password@host/db). Every gateway and rate-limit replica names the same
    # one. "": no database: the replica serves the seed file as it is and the admin API refuses changes.
    url: str = ""
    # The bound on how long a change (a revoked key, a new tier) takes to reach this replica: one poll is one
    # indexed read of the revision; the tables are read again only when it moved.
    poll_s: float = Field(1.0, gt=0.0, le=60.0)
    # A database with no tiers yet is filled from the seed file (the tenants_file setting) once, by the first
    # replica to start; afterwards the file is only read by `python -m tools.admin import`.
    seed_if_empty: bool = True

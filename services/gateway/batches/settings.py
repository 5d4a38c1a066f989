"""The Files and Batches API's settings (nested in the gateway's: MESH_GATEWAY_BATCH__LEASE_S, ...). The limits
hold for each tenant."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BatchSettings(BaseModel, extra="forbid"):
    # Off, or without an admin database (where batches and files are kept), the routes answer 400 saying so.
    enabled: bool = True
    # Where file bytes go: a directory every replica reads and writes.
    files_dir: str = "data/files"
    # Per tenant. The edge buffers an HTTP body whole (EdgeLimits.http_body_max_bytes, 8 MiB): a larger file
    # limit needs that raised with it.
    max_file_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_line_bytes: int = Field(1024 * 1024, gt=0)
    max_lines: int = Field(50_000, gt=0)
    max_files: int = Field(500, gt=0)
    max_batches_in_flight: int = Field(20, gt=0)
    # completion_window: OpenAI takes "24h" only; the mesh takes "<n>s|m|h" within these bounds ("24h" always).
    min_window_s: float = Field(60.0, gt=0.0)
    max_window_s: float = Field(7 * 24 * 3600.0, gt=0.0)
    # Lines this replica runs at once: each is one request at batch priority, which yields to interactive
    # requests in the router's queues.
    concurrency: int = Field(4, gt=0, le=256)
    # A line's lease: renewed every third of it while the line runs; a replica that died leaves its lines to be
    # taken over once their lease ran out.
    lease_s: float = Field(30.0, gt=0.0)
    poll_s: float = Field(0.5, gt=0.0)
    # How long one line may take (a generation's own deadline within it).
    line_timeout_s: float = Field(300.0, gt=0.0)

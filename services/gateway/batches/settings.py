"""The Files and Batches API's settings (nested in the gateway's: MESH_GATEWAY_BATCH__LEASE_S, ...). The limits
hold for each tenant."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class S3Settings(BaseModel, extra="forbid"):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, GCS's XML API). Credentials are not settings: the AWS
    SDK's own chain finds them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a web identity token, an instance role),
    so that a key is never written beside the mesh's configuration."""

    bucket: str = ""
    # Empty: AWS's own endpoint for `region`. MinIO and the other compatible stores: their URL.
    endpoint_url: str = ""
    region: str = "us-east-1"
    # Keys are `prefix` + a file id the mesh made.
    prefix: str = Field("batch-files/", max_length=200)
    # Make the bucket at start when it is missing: for a compose MinIO; a managed bucket is made by its owner.
    create_bucket: bool = False
    timeout_s: float = Field(10.0, gt=0.0)


class BatchSettings(BaseModel, extra="forbid"):
    # Off, or without an admin database (where batches and files are kept), the routes answer 400 saying so.
    enabled: bool = True
    # Where file bytes go: a directory every replica reads and writes, or an S3-compatible bucket.
    storage: Literal["directory", "s3"] = "directory"
    files_dir: str = "data/files"
    s3: S3Settings = S3Settings()
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

    @model_validator(mode="after")
    def _bucket_named(self) -> BatchSettings:
        if self.storage == "s3" and not self.s3.bucket:
            raise ValueError("MESH_GATEWAY_BATCH__STORAGE=s3 needs MESH_GATEWAY_BATCH__S3__BUCKET")
        return self

"""Retrieval's own latency, by stage: query/chunk embedding through the router, and the Milvus search by mode."""

from __future__ import annotations

from prometheus_client import Histogram

STAGE_SECONDS = Histogram("mesh_retrieval_stage_duration_seconds",
                          "Retrieval time by stage (embed, dense_search, sparse_search, hybrid_search)", ["stage"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))

"""Deadline propagation: every downstream call gets what is left of the caller's deadline."""

from __future__ import annotations

import grpc

# The longest one generation may take end to end: the gateway's deadline, the router's cap on one inference call,
# Envoy's route timeout and the cache lease that must outlive a generation are all derived from it. Long enough for
# a 1,024-token answer on a loaded GPU (~50 tokens/s), short enough that a hung replica is noticed by the caller.
GENERATION_BUDGET_S = 60.0
# An ingest stream (upload, chunk, embed, store) at the gateway; Envoy's route and request timeouts derive from it.
INGEST_BUDGET_S = 600.0
# Model metadata, readiness and lists: cheap, and a caller must hear fast when they cannot be read.
METADATA_BUDGET_S = 5.0
# Kept back from the caller's remaining time so that our reply (or a precise error) still reaches it.
DOWNSTREAM_MARGIN_S = 0.05


def within(default_s: float, remaining_s: float | None) -> float:
    """The timeout for a downstream call: the caller's remaining time (None: no deadline) less a margin, capped
    at default_s."""
    if remaining_s is None:
        return default_s
    return max(0.0, min(default_s, remaining_s - DOWNSTREAM_MARGIN_S))


def downstream_timeout(context: grpc.aio.ServicerContext, default_s: float) -> float:
    return within(default_s, context.time_remaining())

"""Python's cyclic garbage collector against a server's latency. A full collection walks every tracked object;
a service's heap after its imports (grpc, protobuf, pydantic, SQLAlchemy, the generated stubs) is ~130k objects,
which one full collection took 90-100 ms to walk on the 2 shared cores of the bench: every stream in flight
stalled that long, the p99 of a batch-priority benchmark's interactive row (BENCHMARKS.md "Batch inference").
Those objects live as long as the process, so they are frozen out of the collector once the server has started
(gc.freeze, as CPython's documentation suggests for long-running servers); the pauses that remain are counted."""

from __future__ import annotations

import gc
import time

from prometheus_client import Histogram

PAUSES = Histogram("mesh_gc_pause_seconds", "Time the cyclic garbage collector stopped this process, by generation",
                   ["generation"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5))
_started: list[float] = [0.0]


def _timed(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        PAUSES.labels(str(info["generation"])).observe(time.perf_counter() - _started[0])


def freeze_startup_heap() -> int:
    """Once the server is up: what exists now lives as long as the process. Collected first so that startup's
    garbage is not kept forever; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    if _timed not in gc.callbacks:
        gc.callbacks.append(_timed)
    return gc.get_freeze_count()

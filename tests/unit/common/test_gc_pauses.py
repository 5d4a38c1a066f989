"""A server freezes its startup heap out of the garbage collector and counts the pauses that remain
(services/common/gc_pauses.py). The real services are checked in tests/integration/test_observability.py: the
dashboard's pause panel must find mesh_gc_pause_seconds on every running service."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import REGISTRY

from services.common import gc_pauses


@pytest.fixture
def restored_collector():
    yield
    gc.unfreeze()
    if gc_pauses._timed in gc.callbacks:
        gc.callbacks.remove(gc_pauses._timed)


def _observed(generation: str) -> tuple[float, float]:
    """(seconds, collections) as /metrics shows them."""
    labels = {"generation": generation}
    return (REGISTRY.get_sample_value("mesh_gc_pause_seconds_sum", labels) or 0.0,
            REGISTRY.get_sample_value("mesh_gc_pause_seconds_count", labels) or 0.0)


def test_what_exists_at_start_is_no_longer_walked_by_a_full_collection(restored_collector):
    import services.gateway.server  # noqa: F401  (a service's heap: what its imports leave behind)
    walked_before = len(gc.get_objects())
    frozen = gc_pauses.freeze_startup_heap()
    assert frozen >= walked_before // 2 > 10_000, (frozen, walked_before)
    assert len(gc.get_objects()) < walked_before // 20, "a full collection still walks the startup heap"


def test_the_pauses_that_remain_are_counted_by_generation(restored_collector):
    gc_pauses.freeze_startup_heap()
    seconds_before, counted_before = _observed("2")
    cycle: list = []
    cycle.append(cycle)
    del cycle
    assert gc.collect(2) >= 1
    seconds, counted = _observed("2")
    assert counted == counted_before + 1 and seconds > seconds_before
    assert gc.callbacks.count(gc_pauses._timed) == 1
    gc_pauses.freeze_startup_heap()  # a second host in one process (the tests) does not count twice
    assert gc.callbacks.count(gc_pauses._timed) == 1

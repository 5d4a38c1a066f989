"""Batch attempts an interactive request may stop. Priority in the fair queue orders who starts next; it cannot
help an interactive request that finds every slot held by batch work on an engine that runs one generation at a
time (llama.cpp on CPU): it would wait for a whole batch line. So when an interactive request has to queue, the
newest batch attempt of the same Triton model is asked to stop; its slot goes to the queue's head (interactive
first), and the batch request goes back into the queue and, where its model can resume a stream, continues from
the tokens it had already produced, so little work is lost. A request is preempted at most `max_per_request`
times, and not at all once it has waited its aging time for a slot (admission.py lets one such request ahead of
interactive work per batch_aging_s): batch work keeps finishing under a steady interactive load.

How an attempt stops depends on who holds its stream: the relay cancels its Triton call; a placement lease asks
the gateway to (a preempt grant on the lease), and only where the gateway said it can (LeaseAsk.preemptible).
Either way the attempt ends with PREEMPTED_CODE, which the attempt loop reads as "queue again", not as a fault."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

PREEMPTED = Counter("mesh_router_preemptions_total",
                    "Batch attempts stopped to give their replica slot to a waiting interactive request, by Triton "
                    "model", ["model"])

PREEMPTED_CODE = grpc.StatusCode.ABORTED


@dataclass(eq=False)
class Stoppable:
    """One running batch attempt; `stop` is set by the attempt once it has a call to stop."""

    model: str
    stop: Callable[[], None] | None = None
    requested: bool = False

    def preempted(self, code: grpc.StatusCode) -> bool:
        """Whether an attempt that ended with `code` ended because it was asked to."""
        return self.requested and code in (PREEMPTED_CODE, grpc.StatusCode.CANCELLED)


class Preemption:
    def __init__(self, enabled: bool, max_per_request: int) -> None:
        self._enabled = enabled
        self._max_per_request = max_per_request
        self._running: dict[str, list[Stoppable]] = {}

    def track(self, model: str, preempted_so_far: int) -> Stoppable | None:
        """A batch attempt about to run; None when it may not be stopped (off, or stopped often enough)."""
        if not self._enabled or preempted_so_far >= self._max_per_request:
            return None
        running = Stoppable(model)
        self._running.setdefault(model, []).append(running)
        return running

    def untrack(self, running: Stoppable | None) -> None:
        if running is None:
            return
        attempts = self._running.get(running.model, [])
        if running in attempts:
            attempts.remove(running)

    def preempt(self, model: str) -> bool:
        """Asks the newest stoppable batch attempt of `model` (the least work lost) to stop: True if one was."""
        for running in reversed(self._running.get(model, [])):
            if running.requested or running.stop is None:
                continue
            running.requested = True
            running.stop()
            PREEMPTED.labels(model).inc()
            return True
        return False

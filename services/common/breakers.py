"""Circuit breakers, one per downstream target (a Triton replica, the cache, retrieval, the router, ...).

pybreaker keeps the state machine (closed → open after `fail_max` consecutive failures → half-open after
`reset_timeout_s` → closed on a success, open again on a failure); this wraps it for asyncio callers, which
pybreaker's own call() cannot time: a call is admitted first and its outcome recorded when it ends.

Only the target's own faults count (UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS): a caller's bad input, our own
shedding (RESOURCE_EXHAUSTED) or a caller's deadline say nothing about the target. A health probe that finds the
target serving again half-opens an open breaker at once, so a restarted target is back within a probe interval
instead of after the full reset timeout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pybreaker
from prometheus_client import Counter, Gauge

STATE = Gauge("mesh_breaker_state", "Circuit breaker state per downstream target: 0 closed, 1 half-open, 2 open",
              ["target"])
REJECTED = Counter("mesh_breaker_rejected_total", "Calls failed fast because the target's breaker was open",
                   ["target"])
_STATE_VALUE = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}

TARGET_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                           grpc.StatusCode.DATA_LOSS})


@dataclass(frozen=True)
class BreakerSettings:
    # 10 consecutive faults are not a blip on a busy target; 60 s lets a restarting Triton load its models before a
    # probe call. The defaults of every service's ResilienceSettings (services/common/resilience.py).
    fail_max: int = 10
    reset_timeout_s: float = 60.0


class BreakerOpenError(Exception):
    """The target's breaker is open: fail fast (UNAVAILABLE) or take the fallback."""


class _Failure(Exception):
    pass


def _succeed() -> None:
    return None


def _fail(reason: str) -> None:
    raise _Failure(reason)


class _StateListener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state, new_state) -> None:
        self._breaker._changed(new_state.name)


class Breaker:
    def __init__(self, target: str, settings: BreakerSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        settings = settings or BreakerSettings()
        self.target = target
        self._clock = clock
        self._opened_at = 0.0
        self._probing = False
        self._cb = pybreaker.CircuitBreaker(fail_max=settings.fail_max, reset_timeout=settings.reset_timeout_s,
                                            name=target, listeners=[_StateListener(self)],
                                            throw_new_error_on_trip=False)
        STATE.labels(target).set(0)

    @property
    def state(self) -> str:
        return self._cb.current_state

    def _changed(self, state: str) -> None:
        if state == pybreaker.STATE_OPEN:
            self._opened_at = self._clock()
        self._probing = False
        STATE.labels(self.target).set(_STATE_VALUE.get(state, 0))

    def _timed_out(self) -> bool:
        return self._clock() - self._opened_at >= self._cb.reset_timeout

    def available(self) -> bool:
        """Whether admit() would let a call through now."""
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_HALF_OPEN:
            return not self._probing
        return self._timed_out()

    def admit(self) -> None:
        """Lets a call through, or raises BreakerOpenError. Half-open admits one probe call at a time."""
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return
        if state == pybreaker.STATE_OPEN and self._timed_out():
            self._cb.half_open()
            state = pybreaker.STATE_HALF_OPEN
        if state == pybreaker.STATE_HALF_OPEN and not self._probing:
            self._probing = True
            return
        REJECTED.labels(self.target).inc()
        wait = max(0.0, self._cb.reset_timeout - (self._clock() - self._opened_at))
        raise BreakerOpenError(f"{self.target} is failing: circuit open after {self._cb.fail_max} consecutive "
                               f"failures; next probe in {wait:.0f} s or when its health check passes")

    def record(self, code: grpc.StatusCode | None, detail: str = "") -> None:
        """The outcome of an admitted call: None or OK is a success; only the target's own faults count."""
        if code is not None and code != grpc.StatusCode.OK and code not in TARGET_FAULTS:
            self._probing = False
            return
        state = self._cb.current_state
        if state == pybreaker.STATE_OPEN:
            return  # a late answer to a call admitted before the breaker opened
        self._probing = False
        if code is None or code == grpc.StatusCode.OK:
            # The hot path: a success on a closed breaker with no failures counted changes nothing.
            if state != pybreaker.STATE_CLOSED or self._cb.fail_counter:
                self._cb.call(_succeed)
        else:
            with contextlib.suppress(Exception):
                self._cb.call(_fail, f"{code.name}: {detail}")

    def abandon(self) -> None:
        """An admitted call ended without an outcome (cancelled by its caller): free the half-open probe slot."""
        self._probing = False

    def healthy(self) -> None:
        """A health probe saw the target serving: an open breaker half-opens now instead of after the timeout."""
        if self._cb.current_state == pybreaker.STATE_OPEN:
            self._cb.half_open()

"""Retries that cannot amplify an outage: capped exponential backoff with full jitter, at most `max_retries`,
and a budget that lets retries add at most `ratio` of the requests' own load, plus a floor per second so that a
quiet service can still retry (Finagle's RetryBudget and its defaults: 20%, 10/s, a 10 s window). The floor's
reserve (floor x window) lets one replica's failure move its in-flight work elsewhere at once; a lasting outage
spends it within seconds and retries fall back to the 20% (+ floor) rate."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

RETRIES = Counter("mesh_retries_total", "Retries by target and outcome (attempted, or refused by the budget)",
                  ["target", "result"])

# Codes worth another attempt: the target could not take the call (down, restarting, connection lost).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetrySettings:
    # 3 retries ride out one replica's restart without tripling an outage's load: retries add at most
    # `budget_ratio` of the requests' load, plus a floor per second saved up over a window. The defaults of every
    # service's ResilienceSettings (services/common/resilience.py).
    max_retries: int = 3
    base_backoff_s: float = 0.025
    max_backoff_s: float = 1.0
    budget_ratio: float = 0.2
    budget_floor_per_s: float = 10.0
    budget_window_s: float = 10.0


class RetryBudget:
    """Tokens earned by requests (`ratio` each) and by time (`floor_per_s`); each retry spends one."""

    def __init__(self, ratio: float, floor_per_s: float, window_s: float, clock=time.monotonic) -> None:
        self._ratio = ratio
        self._floor_per_s = floor_per_s
        self._capacity = max(1.0, floor_per_s * window_s)
        self._tokens = self._capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._floor_per_s)
        self._updated = now

    def on_request(self) -> None:
        self._refill()
        self._tokens = min(self._capacity, self._tokens + self._ratio)

    def try_spend(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Retrier:
    """One per target: the budget is shared by every call to it."""

    def __init__(self, target: str, settings: RetrySettings | None = None) -> None:
        self.target = target
        self.settings = settings or RetrySettings()
        self.budget = RetryBudget(self.settings.budget_ratio, self.settings.budget_floor_per_s,
                                  self.settings.budget_window_s)

    def backoff_s(self, retry: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^retry)]."""
        ceiling = min(self.settings.max_backoff_s, self.settings.base_backoff_s * (2 ** retry))
        return random.uniform(0.0, ceiling)

    def may_retry(self, retry: int, code: grpc.StatusCode | None) -> bool:
        """Whether retry number `retry` (0-based) of a call that failed with `code` may go ahead."""
        if code is not None and code not in RETRYABLE:
            return False
        if retry >= self.settings.max_retries:
            return False
        if not self.budget.try_spend():
            RETRIES.labels(self.target, "budget_exhausted").inc()
            return False
        RETRIES.labels(self.target, "attempted").inc()
        return True

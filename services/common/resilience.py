"""One typed place for every service's breaker and retry values, with per-target overrides."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.common.breakers import Breaker, BreakerSettings
from services.common.retries import Retrier, RetrySettings


class BreakerOverride(BaseModel, extra="forbid"):
    fail_max: int | None = Field(default=None, ge=1)
    reset_timeout_s: float | None = Field(default=None, gt=0)


class ResilienceSettings(BaseModel, extra="forbid"):
    # 10 consecutive faults are not a blip on a busy target; 60 s lets a restarting Triton load its models before a
    # probe call; 3 retries ride out one replica's restart without tripling an outage's load (budgeted below).
    breaker_fail_max: int = Field(default=10, ge=1)
    breaker_reset_timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=3)
    retry_base_backoff_s: float = 0.025
    retry_max_backoff_s: float = 1.0
    # Retries add at most this share of the requests' load, plus a floor per second saved up over a window.
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    retry_budget_floor_per_s: float = Field(default=10.0, ge=0)
    retry_budget_window_s: float = Field(default=10.0, gt=0)
    # Per target (e.g. "cache", or a Triton replica's name): breaker values that differ from the defaults.
    targets: dict[str, BreakerOverride] = Field(default_factory=dict)

    def breaker_settings(self, target: str) -> BreakerSettings:
        override = self.targets.get(target, BreakerOverride())
        return BreakerSettings(
            fail_max=override.fail_max or self.breaker_fail_max,
            reset_timeout_s=override.reset_timeout_s or self.breaker_reset_timeout_s,
        )

    def retry_settings(self) -> RetrySettings:
        return RetrySettings(self.max_retries, self.retry_base_backoff_s, self.retry_max_backoff_s,
                             self.retry_budget_ratio, self.retry_budget_floor_per_s, self.retry_budget_window_s)

    def breaker(self, target: str) -> Breaker:
        return Breaker(target, self.breaker_settings(target))

    def retrier(self, target: str) -> Retrier:
        return Retrier(target, self.retry_settings())

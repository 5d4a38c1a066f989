"""One typed place for every service's breaker and retry values, with per-target overrides."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.common.breakers import Breaker, BreakerSettings
from services.common.retries import Retrier, RetrySettings


class BreakerOverride(BaseModel, extra="forbid"):
    fail_max: int | None = Field(default=None, ge=1)
    reset_timeout_s: float | None = Field(default=None, gt=0)


_BREAKER, _RETRY = BreakerSettings(), RetrySettings()


class ResilienceSettings(BaseModel, extra="forbid"):
    """Every service's breaker and retry settings, from the environment; the defaults are declared once, with
    their reasons, in BreakerSettings (breakers.py) and RetrySettings (retries.py)."""

    breaker_fail_max: int = Field(default=_BREAKER.fail_max, ge=1)
    breaker_reset_timeout_s: float = Field(default=_BREAKER.reset_timeout_s, gt=0)
    max_retries: int = Field(default=_RETRY.max_retries, ge=0, le=3)
    retry_base_backoff_s: float = _RETRY.base_backoff_s
    retry_max_backoff_s: float = _RETRY.max_backoff_s
    retry_budget_ratio: float = Field(default=_RETRY.budget_ratio, ge=0, le=1)
    retry_budget_floor_per_s: float = Field(default=_RETRY.budget_floor_per_s, ge=0)
    retry_budget_window_s: float = Field(default=_RETRY.budget_window_s, gt=0)
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

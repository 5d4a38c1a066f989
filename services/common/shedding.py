"""Load shedding: a bound on the RPCs a process works on at once; beyond it RESOURCE_EXHAUSTED at once, with a
retry-after hint, instead of an unbounded queue. Calls whose deadline has (nearly) passed are refused before any
work starts. Health checks and reflection are never shed."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge

SHED = Counter("mesh_shed_requests_total", "Requests refused at once, by service and reason", ["service", "reason"])
IN_FLIGHT = Gauge("mesh_in_flight_requests", "RPCs being worked on", ["service"])


class LoadShedder:
    """Admission for served calls (services.common.served_calls calls admit/release around each one)."""

    def __init__(self, service: str, max_in_flight: int, min_deadline_s: float = 0.01) -> None:
        self._service = service
        self._max = max_in_flight
        self._min_deadline_s = min_deadline_s
        self.in_flight = 0

    async def admit(self, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining < self._min_deadline_s:
            SHED.labels(self._service, "deadline").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the deadline leaves {max(remaining, 0) * 1000:.0f} ms: too little to start")
        if not self.enter():
            context.set_trailing_metadata((("retry-after", "1"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.refusal())

    def enter(self) -> bool:
        """Takes a place if there is one (every protocol a process serves shares the bound)."""
        if self.in_flight >= self._max:
            SHED.labels(self._service, "capacity").inc()
            return False
        self.in_flight += 1
        IN_FLIGHT.labels(self._service).set(self.in_flight)
        return True

    def refusal(self) -> str:
        return f"{self._service} at capacity ({self._max} requests in flight); retry with backoff"

    def release(self) -> None:
        self.in_flight -= 1
        IN_FLIGHT.labels(self._service).set(self.in_flight)

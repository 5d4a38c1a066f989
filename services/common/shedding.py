"""Load shedding: a bound on the RPCs a process works on at once; beyond it RESOURCE_EXHAUSTED at once, with a
retry-after hint, instead of an unbounded queue. Calls whose deadline has (nearly) passed are refused before any
work starts. Health checks and reflection are never shed.

With a `party_of` (the gateway's: the caller's tenant), one party may hold at most its share of the places, so
that one tenant's slow or many calls cannot take them all from the others."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import grpc
from prometheus_client import Counter, Gauge

from services.common.errors import abort, exhausted, too_late

SHED = Counter("mesh_shed_requests_total", "Requests refused at once, by service and reason", ["service", "reason"])
IN_FLIGHT = Gauge("mesh_in_flight_requests", "RPCs being worked on", ["service"])

Metadata = Sequence[tuple[str, str | bytes]]


class LoadShedder:
    """Admission for served calls (services.common.served_calls calls admit/release around each one)."""

    def __init__(self, service: str, max_in_flight: int, min_deadline_s: float = 0.01, *,
                 party_share: float = 1.0, party_of: Callable[[Metadata], str | None] | None = None) -> None:
        self._service = service
        self._max = max_in_flight
        self._min_deadline_s = min_deadline_s
        self._party_of = party_of
        self._share = party_share
        self._party_max = max(1, math.ceil(max_in_flight * party_share)) if party_of and party_share < 1 else 0
        self._held: dict[str, int] = {}
        self.in_flight = 0

    def party(self, metadata: Metadata | None) -> str | None:
        return self._party_of(metadata or ()) if self._party_max else None

    async def admit(self, context: grpc.aio.ServicerContext) -> str | None:
        """The party the place was taken for, to give back to release()."""
        remaining = context.time_remaining()
        if remaining is not None and remaining < self._min_deadline_s:
            SHED.labels(self._service, "deadline").inc()
            left_ms = max(remaining, 0) * 1000
            await abort(context, too_late(f"the deadline leaves {left_ms:.0f} ms: too little to start"))
        party = self.party(context.invocation_metadata())
        if not self.enter(party):
            await abort(context, exhausted(self.refusal(party), retry_after_s=1))
        return party

    def enter(self, party: str | None = None) -> bool:
        """Takes a place if there is one (every protocol a process serves shares the bound)."""
        if self.in_flight >= self._max:
            SHED.labels(self._service, "capacity").inc()
            return False
        if party is not None:
            held = self._held.get(party, 0)
            if held >= self._party_max:
                SHED.labels(self._service, "party_share").inc()
                return False
            self._held[party] = held + 1
        self.in_flight += 1
        IN_FLIGHT.labels(self._service).set(self.in_flight)
        return True

    def refusal(self, party: str | None = None) -> str:
        if party is not None and self._held.get(party, 0) >= self._party_max:
            return (f"{party!r} has {self._party_max} requests in flight at the {self._service}, its share "
                    f"({self._share:.0%} of {self._max}); retry with backoff, or send fewer at once")
        return f"{self._service} at capacity ({self._max} requests in flight); retry with backoff"

    def release(self, party: str | None = None) -> None:
        if party is not None:
            held = self._held.pop(party) - 1
            if held:
                self._held[party] = held
        self.in_flight -= 1
        IN_FLIGHT.labels(self._service).set(self.in_flight)

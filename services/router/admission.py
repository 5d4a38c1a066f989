"""Admission to saturated replicas: requests that find every replica at its in-flight bound wait in per-tenant
queues, served by start-time fair queuing on their estimated token cost, interactive before batch (batch ages
into the interactive class, so it never starves), and a request that cannot start before its deadline is refused
at once with a retry-after computed from the queue.

Start-time fair queuing (Goyal et al.): a request of tenant t gets the virtual start tag max(V, F_t) and finish
tag start + cost / weight_t, where F_t is t's last finish tag and V the start tag of the request last sent to a
replica; the waiting request with the smallest start tag goes next. Under saturation each backlogged tenant's
share of the tokens served follows its weight, whatever its request rate; an idle tenant does not bank credit
(its tags restart at V). A request's cost is its prompt tokens + max_tokens; when it ends, the tenant's tags move
by what it really used, so a tenant asking for 512 tokens and using 20 is not charged for 512.

Per router: several routers each share their own view fairly; with N routers a tenant's share can deviate by at
most what the others admit in their turn (each router's queue holds only its own callers' requests)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from services.router.balancer import AtCapacityError, NoReplicaError

Placement = TypeVar("Placement")

QUEUED = Gauge("mesh_router_admission_queued", "Requests waiting for a replica slot, by model, tenant and priority",
               ["model", "tenant", "priority"])
WAIT_SECONDS = Histogram("mesh_router_admission_wait_seconds", "Time waited for a replica slot, by model and tenant",
                         ["model", "tenant"], buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
SERVED_TOKENS = Counter("mesh_router_admission_served_tokens_total",
                        "Estimated tokens of the requests admitted, by model and tenant (each tenant's share)",
                        ["model", "tenant"])
REFUSED = Counter("mesh_router_admission_refused_total",
                  "Requests refused instead of queued, by model, tenant and reason", ["model", "tenant", "reason"])


class Priority(IntEnum):
    INTERACTIVE = 0
    BATCH = 1


class QueueRefusal(AtCapacityError):
    """The request cannot start before its deadline (or the queue is full): refuse now, with when to retry."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class AdmissionSettings:
    # A batch request waiting this long competes with interactive ones on its tags alone (one at a time, at most
    # one per this time).
    batch_aging_s: float = 10.0
    # Requests one tenant may have waiting in this router (beyond: refused at once).
    max_queued_per_tenant: int = 256
    # Before anything has finished: the assumed seconds one request holds a slot (for the first estimates).
    initial_service_s: float = 1.0
    # A slot freed this soon after an interactive request of the model ended is not given to a queued batch
    # request yet: the next request of a caller that sends back to back follows within milliseconds, and would
    # otherwise find a batch request in its place, to preempt (a lost start of its prompt and a stop of some
    # milliseconds). Short: a hold longer than that only takes idle time from batch work. Only the last free
    # slot is held; aged batch requests are not held, nor are batch requests that find a free slot at once.
    batch_hold_s: float = 0.0
    # ... or this share of its time to its deadline, when longer: a request that can wait minutes (a Batch API
    # line) yields to interactive work for minutes before it takes a turn ahead of it, one that can wait seconds
    # (a PRIORITY_BATCH call with a short deadline) for seconds. Either still starts before its deadline.
    batch_aging_share: float = 0.5

    def aging_s(self, time_to_deadline_s: float) -> float:
        """How long a batch request with this much time to its deadline waits before it competes as interactive."""
        return max(self.batch_aging_s, self.batch_aging_share * time_to_deadline_s)


@dataclass(frozen=True)
class Ticket:
    """What admission knows of a request: who asks, how much it may cost, how urgent it is, until when."""

    tenant: str
    weight: float
    cost: float
    priority: Priority
    deadline: float  # on the admission's clock


@dataclass(eq=False)
class _Waiter(Generic[Placement]):
    ticket: Ticket
    start_tag: float
    enqueued: float
    ages_at: float  # from then on it competes as interactive (batch requests)
    try_start: Callable[[], Placement]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairAdmission:
    def __init__(self, settings: AdmissionSettings | None = None, slots: Callable[[], int] = lambda: 1,
                 clock: Callable[[], float] = time.monotonic, model: str = "",
                 on_queued: Callable[[Ticket], None] = lambda ticket: None,
                 free_slots: Callable[[], int] = lambda: 1) -> None:
        self._model = model  # the Triton model whose replicas this admits to (metric label)
        self._on_queued = on_queued  # a request had to wait (the router may free a slot for it: preemption)
        self._settings = settings or AdmissionSettings()
        self._slots = slots  # how many requests the saturated replicas run at once (for wait estimates)
        self._free_slots = free_slots  # how many are free now (the batch hold keeps only the last one)
        self._clock = clock
        self._virtual = 0.0
        self._finish: dict[str, float] = {}
        self._waiting: list[_Waiter] = []
        self._service_s = self._settings.initial_service_s
        self._interactive_ended = -math.inf
        self._aged_at: tuple[float, _Waiter | None] | None = None  # _aged's answer for one instant
        self._promoted_at = -math.inf  # when an aged batch request last started
        self._hold_timer: asyncio.TimerHandle | None = None

    def _start_tag(self, ticket: Ticket) -> float:
        return max(self._virtual, self._finish.get(ticket.tenant, 0.0))

    def _tag(self, ticket: Ticket) -> float:
        """Tags a request on arrival: its start tag; the tenant's next request starts where this one finishes."""
        start = self._start_tag(ticket)
        self._finish[ticket.tenant] = start + ticket.cost / ticket.weight
        return start

    def _aged(self, now: float) -> _Waiter | None:
        """The one batch request that competes as interactive: the longest waiting of those past their aging time,
        and at most one per batch_aging_s: starvation protection lets one batch request a turn ahead of
        interactive work now and then, not every batch request that aged together one after the other."""
        if self._aged_at and self._aged_at[0] == now:
            return self._aged_at[1]
        oldest = None if now - self._promoted_at < self._settings.batch_aging_s else min(
            (w for w in self._waiting if w.ticket.priority == Priority.BATCH and now >= w.ages_at
             and not w.future.done()), key=lambda w: w.enqueued, default=None)
        self._aged_at = (now, oldest)
        return oldest

    def _rank(self, waiter: _Waiter, now: float) -> tuple[int, float]:
        klass = Priority.INTERACTIVE if waiter is self._aged(now) else waiter.ticket.priority
        return int(klass), waiter.start_tag

    def _held_until(self, klass: int) -> float:
        """Until when a request of this class may not take a slot (in the past: it may). Only the last free slot
        is held: a pool with slots to spare gives them to batch work at once."""
        if klass != Priority.BATCH or self._interactive_ended + self._settings.batch_hold_s <= self._clock():
            return -math.inf
        return self._interactive_ended + self._settings.batch_hold_s if self._free_slots() <= 1 else -math.inf

    def _hold_ends_later(self, until: float) -> None:
        """Tries the queue again when the hold ends (one timer at a time)."""
        if self._hold_timer is not None:
            return
        loop = asyncio.get_running_loop()

        def ended() -> None:
            self._hold_timer = None
            self.released()
        self._hold_timer = loop.call_later(max(0.0, until - self._clock()), ended)

    def interactive_ended(self) -> None:
        """An interactive request of this model let go of its slot (the start of the batch hold)."""
        self._interactive_ended = self._clock()

    def _ordered(self) -> list[_Waiter]:
        now = self._clock()
        return sorted(self._waiting, key=lambda w: self._rank(w, now))

    def _unclaim(self, ticket: Ticket) -> None:
        finish = self._finish.get(ticket.tenant)
        if finish is not None:
            self._finish[ticket.tenant] = max(self._virtual, finish - ticket.cost / ticket.weight)

    def waiting(self, tenant: str | None = None) -> int:
        return sum(1 for w in self._waiting if tenant is None or w.ticket.tenant == tenant)

    def queues(self) -> dict[str, dict[str, int]]:
        """{tenant: {priority name: requests waiting}} for the admin API."""
        found: dict[str, dict[str, int]] = {}
        for waiter in self._waiting:
            per = found.setdefault(waiter.ticket.tenant, {})
            name = waiter.ticket.priority.name.lower()
            per[name] = per.get(name, 0) + 1
        return found

    def estimated_wait_s(self, ahead: int) -> float:
        """Seconds until a request with `ahead` requests before it gets a slot."""
        return (ahead + 1) * self._service_s / max(1, self._slots())

    def _admit(self, ticket: Ticket, start_tag: float) -> None:
        self._virtual = max(self._virtual, start_tag)
        SERVED_TOKENS.labels(self._model, ticket.tenant).inc(ticket.cost)

    async def enter(self, ticket: Ticket, try_start: Callable[[], Placement],
                    give_back: Callable[[Placement], None]) -> Placement:
        """`try_start` places the request and claims its replica slot at once, or raises AtCapacityError. With
        nobody waiting it is tried right away; else, or when it fails, the request waits its turn. `give_back`
        returns a slot claimed for a request that went away before it could use it."""
        now = self._clock()
        klass = int(ticket.priority)
        # Nobody of its class or above waits (an interactive request does not queue behind held batch work). The
        # hold is for queued requests only: where the engine has slots to spare nothing queues, and batch work
        # starts at once beside interactive work.
        if all(self._rank(w, now)[0] > klass for w in self._waiting):
            try:
                placed = try_start()
            except AtCapacityError:
                pass
            else:
                self._admit(ticket, self._tag(ticket))
                return placed
        return await self._wait(ticket, try_start, give_back)

    async def _wait(self, ticket: Ticket, try_start: Callable[[], Placement],
                    give_back: Callable[[Placement], None]) -> Placement:
        now = self._clock()
        if self.waiting(ticket.tenant) >= self._settings.max_queued_per_tenant:
            REFUSED.labels(self._model, ticket.tenant, "queue_full").inc()
            raise QueueRefusal(f"tenant {ticket.tenant!r} already has {self._settings.max_queued_per_tenant} requests "
                               "waiting for a replica; retry with backoff", self.estimated_wait_s(self.waiting()))
        waiter = _Waiter(ticket, self._start_tag(ticket), now, now + self._settings.aging_s(ticket.deadline - now),
                         try_start)
        rank = self._rank(waiter, now)
        ahead = sum(1 for w in self._waiting if self._rank(w, now) <= rank)
        wait_s = self.estimated_wait_s(ahead)
        if now + wait_s > ticket.deadline:
            REFUSED.labels(self._model, ticket.tenant, "deadline").inc()
            raise QueueRefusal(
                f"every replica is busy and {ahead} requests are ahead of this one: it would start in about "
                f"{wait_s:.1f} s, after its deadline ({max(0.0, ticket.deadline - now):.1f} s left); retry later or "
                "with a longer deadline", wait_s)
        waiter.start_tag = self._tag(ticket)
        self._waiting.append(waiter)
        self._aged_at = None
        QUEUED.labels(self._model, ticket.tenant, ticket.priority.name.lower()).inc()
        self._on_queued(ticket)
        if (held := self._held_until(rank[0])) > now:
            self._hold_ends_later(held)
        try:
            async with asyncio.timeout(max(0.0, ticket.deadline - now)):
                placed = await waiter.future
        except TimeoutError:
            self._unclaim(ticket)
            REFUSED.labels(self._model, ticket.tenant, "deadline").inc()
            raise QueueRefusal("every replica stayed busy until this request's deadline; retry later",
                               self.estimated_wait_s(self.waiting())) from None
        except asyncio.CancelledError:
            # Its turn came just as its caller went away: the slot it was given goes to the next in line.
            if waiter.future.done() and not waiter.future.cancelled():
                give_back(waiter.future.result())
                self.released()
            else:  # never served: the tenant's later requests need not wait for its turn
                self._unclaim(ticket)
            raise
        finally:
            QUEUED.labels(self._model, ticket.tenant, ticket.priority.name.lower()).dec()
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                self._aged_at = None
        WAIT_SECONDS.labels(self._model, ticket.tenant).observe(self._clock() - now)
        return placed

    def released(self) -> None:
        """A slot may have freed: start waiting requests in fair order while their placement succeeds."""
        now = self._clock()
        for waiter in self._ordered():
            if waiter.future.done():
                continue
            if (held := self._held_until(self._rank(waiter, now)[0])) > now:
                self._hold_ends_later(held)
                continue
            try:
                placed = waiter.try_start()
            except AtCapacityError:
                continue  # its pools are full; another waiter's (a different model) may not be
            except NoReplicaError as exc:  # nothing can serve it any more (its replicas went away): it fails now
                self._waiting.remove(waiter)
                self._aged_at = None
                waiter.future.set_exception(exc)
                continue
            if waiter is self._aged(now):
                self._promoted_at = now
            self._waiting.remove(waiter)
            self._aged_at = None
            self._admit(waiter.ticket, waiter.start_tag)
            waiter.future.set_result(placed)

    def settle(self, tenant: str, weight: float, estimated: float, used: float, seconds: float) -> None:
        """A request admitted with `estimated` cost used `used` tokens and held its slot `seconds`: the tenant's
        tags move by the difference, and the service time estimate learns."""
        if tenant in self._finish:
            self._finish[tenant] = max(self._virtual, self._finish[tenant] + (used - estimated) / weight)
        self._service_s = 0.8 * self._service_s + 0.2 * max(seconds, 0.001)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.estimated_wait_s(self.waiting())))

"""Fair admission (services/router/admission.py) against a pool of slots served in simulated time: shares follow
weights on token cost, batch yields to interactive but is not starved, a request that cannot start in time is
refused at once, a slot given to a request that went away goes to the next."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.router.admission import AdmissionSettings, FairAdmission, Priority, QueueRefusal, Ticket
from services.router.balancer import AtCapacityError, NoReplicaError


class Slots:
    def __init__(self, free: int) -> None:
        self.free = free

    def take(self) -> str:
        if self.free <= 0:
            raise AtCapacityError("full")
        self.free -= 1
        return "slot"

    def give_back(self, _: str) -> None:
        self.free += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ticket(tenant: str, weight: float = 1.0, cost: float = 10.0, priority: Priority = Priority.INTERACTIVE,
           deadline: float = 1e9) -> Ticket:
    return Ticket(tenant, weight, cost, priority, deadline)


async def _serve(admission: FairAdmission, slots: Slots, tickets: list[Ticket], serve_first: int,
                 clock: Clock) -> list[str]:
    """Everyone arrives at once (slot full); then requests are completed one at a time: the order they start."""
    started: list[str] = []

    async def one(t: Ticket) -> None:
        await admission.enter(t, slots.take, slots.give_back)
        started.append(t.tenant)

    slots.free = 0
    tasks = [asyncio.create_task(one(t)) for t in tickets]
    await asyncio.sleep(0)
    for _ in range(serve_first):
        clock.now += 0.01
        slots.give_back("slot")
        admission.released()
        await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return started


def _shares(tickets: list[Ticket], turns: int) -> Counter:
    """Who got the first `turns` slots when `tickets` all wait at once."""
    async def run() -> Counter:
        clock = Clock()
        return Counter(await _serve(FairAdmission(clock=clock), Slots(0), tickets, turns, clock))
    return asyncio.run(run())


@pytest.mark.parametrize(("tickets", "turns", "expected"), [
    # Weights 2:1 on equal costs: 2/3 and 1/3 of the turns.
    ([ticket("heavy", weight=2.0) for _ in range(60)] + [ticket("light", weight=1.0) for _ in range(60)], 60,
     {"heavy": 40, "light": 20}),
    # Equal weights, costs 4:1: equal tokens, so four short requests for each long one.
    ([ticket("long", cost=40.0) for _ in range(40)] + [ticket("short", cost=10.0) for _ in range(40)], 25,
     {"short": 20, "long": 5}),
], ids=["weights", "token-cost"])
def test_shares_under_saturation_follow_weights_on_token_cost(tickets, turns, expected):
    shares = _shares(tickets, turns)
    assert all(shares[tenant] == pytest.approx(count, abs=2) for tenant, count in expected.items()), shares


def test_a_flooder_does_not_set_a_quiet_tenants_wait():
    async def run() -> list[str]:
        clock = Clock()
        admission = FairAdmission(clock=clock)
        flood = [ticket("flooder") for _ in range(100)]
        return await _serve(admission, Slots(0), [*flood, ticket("quiet")], 3, clock)

    started = asyncio.run(run())
    assert "quiet" in started[:2], f"the quiet tenant's one request goes within the first turns: {started}"


class Queue:
    """A full pool (no slot free) in simulated time: requests wait in it, slots are freed one at a time, and
    `started` says the order they got one."""

    def __init__(self, settings: AdmissionSettings) -> None:
        self.clock = Clock()
        self.admission = FairAdmission(settings, clock=self.clock)
        self.slots = Slots(0)
        self.started: list[str] = []
        self._tasks: list[asyncio.Task] = []

    async def arrive(self, t: Ticket, name: str) -> None:
        async def one() -> None:
            await self.admission.enter(t, self.slots.take, self.slots.give_back)
            self.started.append(name)
        self._tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0)

    async def free(self, slots: int) -> None:
        for _ in range(slots):
            self.slots.give_back("slot")
            self.admission.released()
            await asyncio.sleep(0)

    async def close(self) -> list[str]:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.started


def test_batch_yields_to_interactive_and_ages_into_its_turn():
    async def run() -> tuple[list[str], list[str]]:
        queue = Queue(AdmissionSettings(batch_aging_s=5.0, batch_aging_share=0.0))
        await queue.arrive(ticket("t", priority=Priority.BATCH), "batch")
        for i in range(5):
            await queue.arrive(ticket("t"), f"i{i}")
        await queue.free(3)
        first = list(queue.started)
        queue.clock.now += 6.0  # the batch request has now waited past its aging
        for _ in range(3):
            await queue.arrive(ticket("u"), "late")
        await queue.free(1)
        return first, await queue.close()

    first, started = asyncio.run(run())
    assert first == ["i0", "i1", "i2"], first
    assert started[3] == "batch", f"aged batch work goes before newer interactive work: {started}"


def test_batch_requests_that_aged_together_go_ahead_of_interactive_work_one_at_a_time():
    async def run() -> list[str]:
        queue = Queue(AdmissionSettings(batch_aging_s=5.0, batch_aging_share=0.0))
        for i in range(3):
            await queue.arrive(ticket("t", priority=Priority.BATCH), f"b{i}")
        queue.clock.now += 6.0  # all three have waited past their aging
        for i in range(3):
            await queue.arrive(ticket("t"), f"i{i}")
        await queue.free(4)
        return await queue.close()

    assert asyncio.run(run()) == ["b0", "i0", "i1", "i2"], "one aged batch request, then the interactive ones"


def test_a_batch_request_yields_for_its_share_of_the_time_to_its_deadline():
    """A Batch API line (300 s to its deadline) waits behind a saturating interactive load for half of that, a
    PRIORITY_BATCH call with 20 s for the 10 s floor: each ages in when its own deadline says it must."""
    async def run() -> tuple[list[str], list[str], list[str]]:
        queue = Queue(AdmissionSettings(batch_aging_s=10.0, batch_aging_share=0.5))
        now = queue.clock.now
        await queue.arrive(ticket("t", priority=Priority.BATCH, deadline=now + 300.0), "line")
        await queue.arrive(ticket("t", priority=Priority.BATCH, deadline=now + 20.0), "call")
        steps: list[list[str]] = []
        for waited in (9.0, 11.0, 149.0, 151.0):  # a new interactive request each time a slot frees
            queue.clock.now = now + waited
            await queue.arrive(ticket("u"), f"i{waited:.0f}")
            await queue.free(1)
            steps.append(list(queue.started))
        await queue.close()
        return steps[0], steps[1], steps[2:]

    at_9, at_11, late = asyncio.run(run())
    assert at_9 == ["i9"], "neither has aged at 9 s"
    assert at_11 == ["i9", "call"], "the 20 s call ages in at 10 s, the line does not"
    assert late == [["i9", "call", "i11"], ["i9", "call", "i11", "line"]], "the line ages in at 150 s, not 149 s"


def test_a_request_that_can_start_in_time_waits_and_takes_its_fair_turn():
    async def run() -> list[str]:
        clock = Clock()
        admission = FairAdmission(AdmissionSettings(initial_service_s=2.0), slots=lambda: 1, clock=clock)
        # b is behind one of a's (equal start tags, a came first): about 4 s, within its 5 s, so it waits.
        tickets = [ticket("a"), ticket("a"), ticket("a"), ticket("b", deadline=clock.now + 5.0)]
        return await _serve(admission, Slots(0), tickets, 2, clock)

    assert asyncio.run(run()) == ["a", "b"]


def test_deadline_refusal_is_immediate_and_names_the_wait():
    async def run() -> tuple[QueueRefusal, float]:
        clock = Clock()
        admission = FairAdmission(AdmissionSettings(initial_service_s=2.0), slots=lambda: 1, clock=clock)
        slots = Slots(0)
        waiting = [asyncio.create_task(admission.enter(ticket("a"), slots.take, slots.give_back)) for _ in range(5)]
        await asyncio.sleep(0)
        started = asyncio.get_running_loop().time()
        try:
            with pytest.raises(QueueRefusal) as refused:
                await admission.enter(ticket("a", deadline=clock.now + 3.0), slots.take, slots.give_back)
            return refused.value, asyncio.get_running_loop().time() - started
        finally:
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)

    refusal, took = asyncio.run(run())
    assert took < 0.05 and refusal.retry_after_s == pytest.approx(12.0) and "after its deadline" in str(refusal)


def test_a_slot_given_to_a_request_that_went_away_goes_to_the_next():
    async def run() -> tuple[int, bool]:
        admission = FairAdmission()
        slots = Slots(0)
        first = asyncio.create_task(admission.enter(ticket("a"), slots.take, slots.give_back))
        second = asyncio.create_task(admission.enter(ticket("b"), slots.take, slots.give_back))
        await asyncio.sleep(0)
        slots.give_back("slot")
        admission.released()  # `first` gets the slot ...
        first.cancel()        # ... and goes away before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0)
        got = second.done() and second.result() == "slot"
        return slots.free, got

    free, second_got_it = asyncio.run(run())
    assert second_got_it and free == 0


def test_an_idle_tenant_does_not_bank_credit():
    async def run() -> list[str]:
        clock = Clock()
        admission = FairAdmission(clock=clock)
        slots = Slots(0)
        # "busy" is served alone for a long time; then "idle" arrives: it gets its share from now on, not a
        # backlog of turns it did not use.
        early = await _serve(admission, slots, [ticket("busy") for _ in range(30)], 30, clock)
        assert early == ["busy"] * 30
        return await _serve(admission, slots, [ticket("busy") for _ in range(10)] + [ticket("idle") for _ in range(10)],
                            10, clock)

    started = asyncio.run(run())
    assert Counter(started)["idle"] == pytest.approx(5, abs=1), started


def test_a_waiting_request_whose_replicas_went_away_fails_instead_of_waiting():
    async def run() -> BaseException | None:
        admission = FairAdmission()
        slots = Slots(0)
        waiting = asyncio.create_task(admission.enter(ticket("a"), slots.take, slots.give_back))
        await asyncio.sleep(0)

        def gone() -> str:
            raise NoReplicaError("no ready replica")
        other = asyncio.create_task(admission.enter(ticket("b"), gone, slots.give_back))
        await asyncio.sleep(0)
        slots.give_back("slot")
        admission.released()  # `a` starts; `b` can no longer be placed anywhere: told so, not left waiting
        await asyncio.sleep(0)
        assert waiting.done() and waiting.result() == "slot"
        return other.exception() if other.done() else None

    failure = asyncio.run(run())
    assert isinstance(failure, NoReplicaError)

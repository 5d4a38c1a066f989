"""Which batch attempt an interactive request stops (services/router/preemption.py), and the fair queue's call
when a request has to wait (services/router/admission.py)."""

from __future__ import annotations

import asyncio
import time

import grpc

from services.router.admission import AdmissionSettings, FairAdmission, Priority, Ticket
from services.router.balancer import AtCapacityError
from services.router.preemption import PREEMPTED_CODE, Preemption


def _stopped(log: list[str], name: str):
    return lambda: log.append(name)


def test_the_newest_stoppable_attempt_of_the_model_is_stopped_once():
    preemption = Preemption(enabled=True, max_per_request=3)
    stopped: list[str] = []
    older, newer = preemption.track("llm", 0), preemption.track("llm", 0)
    other_model = preemption.track("embedder", 0)
    not_yet_running = preemption.track("llm", 0)  # tracked, but its call has not started: nothing to stop
    older.stop, newer.stop, other_model.stop = (_stopped(stopped, n) for n in ("older", "newer", "other"))
    assert preemption.preempt("llm") and stopped == ["newer"]
    assert preemption.preempt("llm") and stopped == ["newer", "older"]
    assert not preemption.preempt("llm"), "each attempt is asked once; the one without a call is left"
    assert newer.preempted(PREEMPTED_CODE) and newer.preempted(grpc.StatusCode.CANCELLED)
    assert not newer.preempted(grpc.StatusCode.UNAVAILABLE), "a replica's own failure is not a preemption"
    assert not other_model.requested and not not_yet_running.requested


def test_an_ended_attempt_cannot_be_stopped():
    preemption = Preemption(enabled=True, max_per_request=3)
    running = preemption.track("llm", 0)
    running.stop = lambda: None
    preemption.untrack(running)
    preemption.untrack(running)  # twice is harmless (the loop's finally after an exception)
    assert not preemption.preempt("llm")


def test_a_request_preempted_often_enough_runs_to_its_end_and_off_means_never():
    assert Preemption(enabled=True, max_per_request=3).track("llm", 3) is None
    assert Preemption(enabled=True, max_per_request=3).track("llm", 2) is not None
    assert Preemption(enabled=False, max_per_request=3).track("llm", 0) is None


def test_the_queue_says_when_a_request_has_to_wait():
    async def scenario() -> list[Priority]:
        queued: list[Priority] = []
        admission = FairAdmission(AdmissionSettings(), on_queued=lambda ticket: queued.append(ticket.priority))
        free = [False]

        def try_start() -> str:
            if not free[0]:
                raise AtCapacityError("full")
            free[0] = False
            return "slot"

        ticket = Ticket("acme", 1.0, 1.0, Priority.INTERACTIVE, time.monotonic() + 30)
        placed = await admission.enter(ticket, lambda: "slot", lambda _: None)
        assert placed == "slot" and queued == [], "started at once: nobody told"
        waiting = asyncio.ensure_future(admission.enter(ticket, try_start, lambda _: None))
        await asyncio.sleep(0)
        free[0] = True
        admission.released()
        assert await waiting == "slot"
        return queued

    assert asyncio.run(scenario()) == [Priority.INTERACTIVE]


def test_a_slot_freed_by_interactive_work_waits_a_moment_for_more_before_batch_takes_it():
    """The batch hold: batch work waits `batch_hold_s` after an interactive request ended, an interactive request
    arriving meanwhile takes the slot at once (not behind the held batch request), and the batch request gets it
    when the hold ends."""
    async def scenario() -> list[str]:
        hold_s = 0.2
        admission = FairAdmission(AdmissionSettings(batch_hold_s=hold_s))
        free, order = [1], []

        def try_start(name: str):
            def start() -> str:
                if not free[0]:
                    raise AtCapacityError("full")
                free[0] -= 1
                order.append(name)
                return name
            return start

        def ticket(priority: Priority) -> Ticket:
            return Ticket("acme", 1.0, 1.0, priority, time.monotonic() + 30)

        def done() -> None:
            free[0] += 1
            admission.released()

        assert await admission.enter(ticket(Priority.INTERACTIVE), try_start("chat-1"), lambda _: None)
        batch = asyncio.ensure_future(admission.enter(ticket(Priority.BATCH), try_start("batch"), lambda _: None))
        await asyncio.sleep(0.01)
        admission.interactive_ended()
        done()
        await asyncio.sleep(0.05)
        assert not batch.done(), "held: a slot just freed by interactive work"
        assert await admission.enter(ticket(Priority.INTERACTIVE), try_start("chat-2"), lambda _: None)
        admission.interactive_ended()
        done()
        started = time.monotonic()
        await batch
        assert time.monotonic() - started >= hold_s * 0.9, "the batch request waited out the hold"
        return order

    assert asyncio.run(scenario()) == ["chat-1", "chat-2", "batch"]


def test_only_the_last_free_slot_is_held():
    """A pool with slots to spare gives them to queued batch work at once, even right after interactive work."""
    async def scenario() -> bool:
        free = [2]
        admission = FairAdmission(AdmissionSettings(batch_hold_s=5.0), free_slots=lambda: free[0])
        taken = [False]

        def try_start() -> str:
            if not taken[0]:
                taken[0] = True
                raise AtCapacityError("full at first")
            return "slot"

        batch = asyncio.ensure_future(admission.enter(Ticket("acme", 1.0, 1.0, Priority.BATCH, time.monotonic() + 30),
                                                      try_start, lambda _: None))
        await asyncio.sleep(0)
        admission.interactive_ended()
        admission.released()
        await asyncio.sleep(0)
        return batch.done()

    assert asyncio.run(scenario()), "two free slots: the batch request takes one at once"

"""Placement leases: the router decides where a generation runs (admission, fair queue turn, breaker, replica
slot, failover and resume policy) while its tokens flow from the replica to the gateway, past no Python relay of
the router's. The lease is one bidi call: its open connection holds the slot, so a gateway that dies gives the
slot back with its connection (no timer to tune), and each attempt's report is the breaker's verdict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from inference_mesh.v1 import router_pb2, router_pb2_grpc
from services.common.errors import MeshError, invalid
from services.router.balancer import Route
from services.router.inference_service import (
    NEEDS,
    RESUMED,
    ROUTED,
    Asked,
    Attempts,
    CallerGone,
    Placed,
    RoutingInferenceService,
    tenant_of,
    ticket_of,
)

_CODES = {code.value[0]: code for code in grpc.StatusCode}

LEASES = Counter("mesh_router_leases_total",
                 "Placement leases by public model and end: served, refused (the router's verdict) or abandoned "
                 "(the caller left before reporting)", ["model", "end"])


@dataclass
class ReportedProgress:
    """What the gateway says it has passed on, over every attempt: the attempt loop's view of a stream it does
    not carry (the same questions it asks of a StreamProgress)."""

    responses: int = 0
    tokens_sent: int = 0
    resumable: bool = True

    @property
    def started(self) -> bool:
        return self.responses > 0

    def update(self, report: router_pb2.AttemptReport) -> None:
        self.responses, self.tokens_sent, self.resumable = report.responses, report.tokens, report.resumable


def lease_asked(ask: router_pb2.LeaseAsk, tenant: str) -> Asked:
    """The route key as `asked` reads it from a KServe request: the prefix key, else the session; the canary
    version sticks to the session, else the tenant."""
    needs = frozenset(NEEDS[name] for name in ask.inputs if name in NEEDS)
    return Asked(ask.model, ask.version, Route(affinity_key=ask.affinity_key or ask.session,
                                               version_key=ask.session or tenant, needs=needs))


def grant(placed: Placed, attempts: Attempts, stall_timeout_s: float) -> router_pb2.LeaseGrant:
    replica = placed.replica
    return router_pb2.LeaseGrant(
        replica=replica.name, pool=replica.pool, endpoint=replica.endpoint, authority=replica.authority,
        triton_model=placed.spec.triton_model, triton_version=placed.version, spilled=placed.choice.spilled,
        model_version=placed.spec.version, fallback=placed.fallback, retries=attempts.retries,
        resumed=attempts.resumed, stall_timeout_s=stall_timeout_s)


def refusal(error: MeshError) -> router_pb2.LeaseGrant:
    retry_after = next((float(v) for k, v in error.trailing if k == "retry-after"), 0.0)
    return router_pb2.LeaseGrant(refused_code=error.code.value[0], refused=error.message, retry_after_s=retry_after)


def _status(code: int) -> grpc.StatusCode:
    return _CODES.get(code, grpc.StatusCode.UNKNOWN)


class PlacementService(router_pb2_grpc.PlacementLeasesServicer):
    def __init__(self, routing: RoutingInferenceService, stall_timeout_s: float) -> None:
        self._routing = routing
        self._stall_timeout_s = stall_timeout_s

    async def Lease(self, request_iterator: AsyncIterator[router_pb2.LeaseReport],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.LeaseGrant]:
        reports = aiter(request_iterator)
        first = await anext(reports, None)
        if first is None or first.WhichOneof("report") != "ask":
            raise invalid("a lease opens with its ask (LeaseReport.ask), then one outcome per grant")
        grants: asyncio.Queue[router_pb2.LeaseGrant | None] = asyncio.Queue()
        leasing = asyncio.create_task(self._lease(first.ask, reports, grants, context))
        leasing.add_done_callback(lambda _: grants.put_nowait(None))
        end = "abandoned"
        try:
            while (granted := await grants.get()) is not None:
                yield granted
            try:
                await leasing
                end = "served"
            except MeshError as error:
                end = "refused"
                yield refusal(error)
            except CallerGone:
                pass  # it closed its side (or its deadline passed) without a report: nobody to answer
        finally:
            LEASES.labels(first.ask.model if self._routing.is_known(first.ask.model) else "", end).inc()
            leasing.cancel()
            await asyncio.gather(leasing, return_exceptions=True)

    async def _lease(self, ask: router_pb2.LeaseAsk, reports: AsyncIterator[router_pb2.LeaseReport],
                     grants: asyncio.Queue[router_pb2.LeaseGrant | None], context: grpc.aio.ServicerContext) -> None:
        routing = self._routing
        spec = routing.resolve(ask.model)
        asked = lease_asked(ask, tenant_of(context))
        ticket = ticket_of(context, routing.default_timeout_s)
        progress = ReportedProgress()
        attempts = Attempts()
        began = time.monotonic()
        used = ticket.cost

        async def attempt(placed: Placed) -> tuple[grpc.StatusCode, str] | None:
            nonlocal began, used
            began = time.monotonic()
            grants.put_nowait(grant(placed, attempts, self._stall_timeout_s))
            if attempts.stoppable is not None and ask.preemptible:
                attempts.stoppable.stop = lambda: grants.put_nowait(router_pb2.LeaseGrant(preempt=True))
            with placed.replica.track(placed.spec.triton_model, claimed=True):
                report = await anext(reports, None)
            if report is None or report.WhichOneof("report") != "outcome":
                raise CallerGone("the lease ended without the attempt's outcome")
            outcome = report.outcome
            progress.update(outcome)
            if outcome.code != grpc.StatusCode.OK.value[0]:
                return _status(outcome.code), outcome.detail
            used = float(outcome.used_tokens) or ticket.cost
            ROUTED.labels(asked.public_name, outcome.model_version or placed.version, placed.replica.pool,
                          placed.replica.name).inc()
            return None

        await routing.attempt_loop(spec, asked, ticket, attempts, attempt, progress)
        if attempts.resumed:
            RESUMED.labels(asked.public_name, "completed").inc()
        routing.admission(spec).settle(ticket.tenant, ticket.weight, ticket.cost, used, time.monotonic() - began)

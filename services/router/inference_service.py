"""The router's KServe v2 GRPCInferenceService: public model names in, placement out in parameters."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import Counter
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.breakers import BreakerOpenError
from services.common.deadlines import downstream_timeout
from services.common.errors import MeshError, exhausted, invalid, not_found, stream_error_text, unavailable
from services.common.kserve import SCHEMA_INPUT, TOOLS_INPUT, is_final_response, read_to_end, used_tokens
from services.common.placement import ServedBy, aim, stamp
from services.common.retries import Retrier
from services.common.stream_progress import StreamProgress
from services.common.wire import (
    AFFINITY_PARAMETER,
    COST_HEADER,
    PREEMPTED_DETAIL,
    PRIORITY_HEADER,
    RETRY_AFTER_PARAMETER,
    SESSION_PARAMETER,
    SHARE_WEIGHT_HEADER,
    TENANT_HEADER,
)
from services.router import kserve_metadata
from services.router.admission import AdmissionSettings, FairAdmission, Priority, QueueRefusal, Ticket
from services.router.balancer import AtCapacityError, Balancer, Choice, NoReplicaError, Route
from services.router.canary import choose_version
from services.router.coalescing import Outbox, Relayed, coalesced
from services.router.preemption import PREEMPTED_CODE, Preemption, Stoppable
from services.router.registry import STRUCTURED_OUTPUT, TOOLS, ModelSpec
from services.router.replicas import Replica
from services.router.settings import RouterSettings
from services.router.state import RouterState

log = logging.getLogger(__name__)

# A call that fails with these is tried again elsewhere (before any response; a resumable stream also after).
_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE,)

ROUTED = Counter("mesh_router_requests_total", "Requests routed, by public model, version, pool and replica",
                 ["model", "version", "pool", "replica"])
FALLBACKS = Counter("mesh_router_fallbacks_total", "Requests served by a fallback pool or model", ["model", "kind"])
RESUMED = Counter("mesh_router_stream_resumes_total",
                  "Streams continued on another replica after theirs failed, by model and outcome", ["model", "result"])


@dataclass
class Placed:
    """Where one attempt goes: the model spec used (the asked one, or its fallback), its version and the replica."""

    spec: ModelSpec
    version: str
    choice: Choice
    fallback: str = ""

    @property
    def replica(self) -> Replica:
        return self.choice.replica

    def aim(self, request: service_pb2.ModelInferRequest) -> None:
        aim(request, self.spec.triton_model, self.version, self.choice.spilled)


class CallerGone(Exception):
    """The caller left an attempt without its outcome (a lease closed early): no verdict on the replica."""


class Progress(Protocol):
    """What the attempt loop asks of a stream's delivery so far, whoever carries the stream."""

    @property
    def started(self) -> bool: ...

    @property
    def resumable(self) -> bool: ...

    @property
    def responses(self) -> int: ...

    @property
    def tokens_sent(self) -> int: ...


@dataclass
class Attempts:
    """Retries and resumes of one request, stamped on its last response."""

    retries: int = 0
    resumed: int = 0
    preempted: int = 0
    # The running attempt, while an interactive request may stop it (a batch request's; None otherwise).
    stoppable: Stoppable | None = None


def _stamp(response: service_pb2.ModelInferResponse, model_name: str, placed: Placed, attempts: Attempts) -> None:
    replica = placed.replica
    stamp(response, model_name, ServedBy(replica.pool, replica.name, placed.spec.version, placed.fallback,
                                         attempts.retries, attempts.resumed))


def _no_replica_code(exc: NoReplicaError) -> grpc.StatusCode:
    # Shedding (every replica at its bound) is the caller's cue to back off; no replica at all is an outage.
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, AtCapacityError) else grpc.StatusCode.UNAVAILABLE


def _parameter(request: service_pb2.ModelInferRequest, name: str) -> str:
    return request.parameters[name].string_param if name in request.parameters else ""


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    return next((v for k, v in context.invocation_metadata() or () if k == TENANT_HEADER), "")


def _bounded(text: str | None, default: float, low: float, high: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return min(high, max(low, value)) if value == value else default  # NaN: the default


def ticket_of(context: grpc.aio.ServicerContext, default_timeout_s: float) -> Ticket:
    """Who asks and what the request may cost, from the gateway's headers; a caller without them (a KServe client
    inside the mesh) counts as one interactive token of weight 1 under the tenant header it sent, if any."""
    headers = dict(context.invocation_metadata() or ())
    remaining = context.time_remaining()
    return Ticket(tenant=str(headers.get(TENANT_HEADER, "")),
                  weight=_bounded(headers.get(SHARE_WEIGHT_HEADER), 1.0, 0.01, 100.0),
                  cost=_bounded(headers.get(COST_HEADER), 1.0, 1.0, 1e7),
                  priority=Priority.BATCH if headers.get(PRIORITY_HEADER) == "batch" else Priority.INTERACTIVE,
                  deadline=time.monotonic() + (remaining if remaining is not None else default_timeout_s))


def _error_response(error: MeshError) -> service_pb2.ModelStreamInferResponse:
    """A stream's failure as KServe carries it: "CODE: detail", and the retry-after hint as a parameter."""
    response = service_pb2.ModelStreamInferResponse(error_message=stream_error_text(error.code, error.message))
    for key, value in error.trailing:
        if key == "retry-after":
            response.infer_response.parameters[RETRY_AFTER_PARAMETER].double_param = float(value)
    return response


def _replica_failure(code: grpc.StatusCode) -> grpc.StatusCode:
    """A replica's call that ends CANCELLED was cancelled by the replica's side (the router's own caller going
    away raises CancelledError instead): the replica went away, UNAVAILABLE, which fails over (the gateway reads
    its hops the same way, services/gateway/errors.py)."""
    return grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.CANCELLED else code


# One attempt on one placement: None when it succeeded, else the replica's failure (code, detail).
Attempt = Callable[[Placed], Awaitable[tuple[grpc.StatusCode, str] | None]]


# The contract's optional inputs that only some engines can honour, and the capability each needs.
NEEDS = {SCHEMA_INPUT: STRUCTURED_OUTPUT, TOOLS_INPUT: TOOLS}


@dataclass(frozen=True)
class Asked:
    """What the caller asked for, read once before any attempt rewrites the request."""

    public_name: str
    version: str
    route: Route


def asked(request: service_pb2.ModelInferRequest, tenant: str) -> Asked:
    """The route key: the prefix-affinity key, else the session; the canary version sticks to the session, else
    the tenant (the gateway, which chose the version before its cache, used the same key)."""
    session = _parameter(request, SESSION_PARAMETER)
    needs = frozenset(NEEDS[t.name] for t in request.inputs if t.name in NEEDS)
    return Asked(request.model_name, request.model_version,
                 Route(affinity_key=_parameter(request, AFFINITY_PARAMETER) or session, version_key=session or tenant,
                       needs=needs))


class RoutingInferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: RouterState, balancer: Balancer, settings: RouterSettings, retrier: Retrier) -> None:
        self._state = state
        self._balancer = balancer
        self.default_timeout_s = settings.default_timeout_s
        self._metadata_timeout_s = settings.metadata_timeout_s
        self._retrier = retrier
        # A stream whose replica sends nothing for this long after its first response has stalled: fail over.
        self._stall_timeout_s = settings.stream_stall_timeout_s
        # Fair queues per Triton model, for requests that find every replica of it at its bound.
        self._admission_settings = AdmissionSettings(settings.batch_aging_s, settings.max_queued_per_tenant,
                                                     batch_hold_s=settings.batch_hold_s,
                                                     batch_aging_share=settings.batch_aging_share)
        self._admissions: dict[str, FairAdmission] = {}
        # The latest spec each queue was asked for: a registry reload changes placements and slot counts.
        self._admission_specs: dict[str, ModelSpec] = {}
        self._preemption = Preemption(settings.preempt_batch, settings.max_preemptions_per_request)

    def admission(self, spec: ModelSpec) -> FairAdmission:
        model = spec.triton_model
        self._admission_specs[model] = spec
        found = self._admissions.get(model)
        if found is None:
            found = FairAdmission(self._admission_settings,
                                  slots=lambda: self._balancer.slots(self._admission_specs[model]), model=model,
                                  on_queued=lambda ticket: self._queued(model, ticket),
                                  free_slots=lambda: self._balancer.free_slots(self._admission_specs[model]))
            self._admissions[spec.triton_model] = found
        return found

    def _queued(self, model: str, ticket: Ticket) -> None:
        if ticket.priority is Priority.INTERACTIVE:
            self._preemption.preempt(model)

    def admissions(self) -> dict[str, FairAdmission]:
        return dict(self._admissions)

    def _released(self) -> None:
        """A slot freed somewhere: the router-wide bound may have held back any model's queue."""
        for admission in list(self._admissions.values()):
            if admission.waiting():
                admission.released()

    def _claimed(self, spec: ModelSpec, ask: Asked, route: Route) -> Placed:
        placed = self._place(spec, ask, route)
        placed.replica.claim(placed.spec.triton_model)
        return placed

    @staticmethod
    def _unclaim(placed: Placed) -> None:
        placed.replica.unclaim(placed.spec.triton_model)

    async def _admitted_placement(self, spec: ModelSpec, ask: Asked, route: Route, ticket: Ticket) -> Placed:
        """A placement: now, or after the request's turn in the model's fair queue; its replica slot claimed."""
        return await self.admission(spec).enter(ticket, lambda: self._claimed(spec, ask, route), self._unclaim)

    def is_known(self, name: str) -> bool:
        return name in self._state.registry.models

    def any_model_ready(self) -> bool:
        registry = self._state.registry
        return any(self._balancer.can_serve_any(spec, registry.fallback_of(spec)) for spec in registry.models.values())

    def _unknown(self, name: str) -> str:
        return f"unknown model {name!r}; known models: {sorted(self._state.registry.models)}"

    def resolve(self, name: str) -> ModelSpec:
        spec = self._state.registry.models.get(name)
        if spec is None:
            raise not_found(self._unknown(name))
        return spec

    def _place(self, spec: ModelSpec, ask: Asked, route: Route) -> Placed:
        """A replica of the model's pools in order (noting preferred pools passed over), else of its fallback
        model; raises NoReplicaError (AtCapacityError when only capacity is missing)."""
        try:
            choice = self._balancer.place(spec, route)
            fallback = f"pool {choice.passed_over[0]}->{choice.replica.pool}" if choice.passed_over else ""
            if fallback:
                FALLBACKS.labels(ask.public_name, "pool").inc()
            version = ask.version or choose_version(ask.public_name, spec.versions, route.version_key, spec.version)
            return Placed(spec, version, choice, fallback)
        except NoReplicaError as exc:
            backup = self._state.registry.fallback_of(spec)
            if backup is None:
                raise
            try:
                choice = self._balancer.place(backup, route)
            except NoReplicaError:
                raise exc from None
        # The fallback's own Triton model and version; the caller still sees the name it asked for.
        FALLBACKS.labels(ask.public_name, "model").inc()
        return Placed(backup, choose_version(spec.fallback, backup.versions, route.version_key, backup.version),
                      choice, f"model {ask.public_name}->{spec.fallback}")

    def _check_capable(self, spec: ModelSpec, ask: Asked) -> None:
        """A request needing a capability no placement declares is refused before it waits anywhere: running it
        elsewhere would answer without what it asked for (free text for a schema)."""
        needs = ask.route.needs
        if not needs or spec.pools_supporting(needs):
            return
        backup = self._state.registry.fallback_of(spec)
        if backup is not None and backup.pools_supporting(needs):
            return
        raise invalid(f"model {ask.public_name!r} cannot serve {', '.join(sorted(needs))}: none of its pools "
                      f"({', '.join(spec.pool_names)}) declares it in the registry; use a model whose pools do "
                      "(GET /v1/models lists them) or drop response_format / tools")

    def _admitted(self, placed: Placed, route: Route) -> Route | None:
        """None when the replica's breaker admits the call; else the route without it (another took the probe)."""
        try:
            placed.replica.breaker.admit()
            return None
        except BreakerOpenError:
            return route.excluding(placed.replica.name)

    async def _retry(self, retry: int, code: grpc.StatusCode) -> bool:
        if not self._retrier.may_retry(retry, code):
            return False
        await asyncio.sleep(self._retrier.backoff_s(retry))
        return True

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.any_model_ready())

    async def ModelReady(self, request, context):
        spec = self._state.registry.models.get(request.name)
        return service_pb2.ModelReadyResponse(ready=spec is not None and self._balancer.can_serve_any(
            spec, self._state.registry.fallback_of(spec)))

    async def ModelMetadata(self, request, context):
        spec = self.resolve(request.name)
        return await kserve_metadata.model_metadata(
            spec, request.name, kserve_metadata.hosting(self._state.replicas.replicas, spec),
            downstream_timeout(context, self._metadata_timeout_s))

    async def ModelConfig(self, request, context):
        spec = self.resolve(request.name)
        return await kserve_metadata.model_config(
            spec, request.name, request.version, kserve_metadata.hosting(self._state.replicas.replicas, spec),
            downstream_timeout(context, self._metadata_timeout_s))

    async def ModelStatistics(self, request, context):
        """One model's statistics, or (no name) every public model's, summed over the replicas hosting it."""
        names = [request.name] if request.name else sorted(self._state.registry.models)
        response = service_pb2.ModelStatisticsResponse()
        timeout_s = downstream_timeout(context, self._metadata_timeout_s)
        for name in names:
            spec = self.resolve(name)
            response.model_stats.extend(await kserve_metadata.model_statistics(
                spec, name, request.version, kserve_metadata.hosting(self._state.replicas.replicas, spec), timeout_s))
        return response

    async def RepositoryIndex(self, request, context):
        """The registry's public models, READY when a replica (or the fallback) can serve them now."""
        registry = self._state.registry
        response = service_pb2.RepositoryIndexResponse()
        for name, spec in sorted(registry.models.items()):
            ready = self._balancer.can_serve_any(spec, registry.fallback_of(spec))
            if request.ready and not ready:
                continue
            response.models.add(name=name, version=spec.version, state="READY" if ready else "UNAVAILABLE",
                                reason="" if ready else "no replica of its pools can serve it now")
        return response

    async def ModelInfer(self, request, context):
        spec = self.resolve(request.model_name)
        ask = asked(request, tenant_of(context))
        attempts = Attempts()
        answered: list[service_pb2.ModelInferResponse] = []

        async def call(placed: Placed) -> tuple[grpc.StatusCode, str] | None:
            placed.aim(request)
            with placed.replica.track(placed.spec.triton_model, claimed=True):
                try:
                    answered.append(await placed.replica.stub.ModelInfer(
                        request, timeout=downstream_timeout(context, self.default_timeout_s)))
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""
            return None

        placed = await self.attempt_loop(spec, ask, ticket_of(context, self.default_timeout_s), attempts, call)
        response = answered[-1]
        _stamp(response, ask.public_name, placed, attempts)
        ROUTED.labels(ask.public_name, response.model_version, placed.replica.pool, placed.replica.name).inc()
        return response

    async def attempt_loop(self, spec: ModelSpec, ask: Asked, ticket: Ticket, attempts: Attempts,
                            attempt: Attempt, progress: Progress | None = None) -> Placed:
        """The one attempt loop, unary and streaming: each attempt takes its turn in the model's fair queue, is
        placed on a replica whose breaker admits it, runs, and is recorded on that breaker; a failover failure is
        tried again on another replica (a started stream only if the model can resume it) while the retry policy
        allows. Returns the placement that succeeded; any other end is a MeshError, converted here only."""
        route = ask.route
        self._check_capable(spec, ask)
        self._retrier.budget.on_request()
        first_model = ""
        while True:
            note = self.progress_note(progress)
            try:
                # A retry after a replica failed waits like a new request when the rest are busy, rather than
                # failing for want of a free slot.
                asked_at = time.monotonic()
                placed = await self._admitted_placement(spec, ask, route, ticket)
                waited_s = time.monotonic() - asked_at
                if progress is not None and progress.started and placed.spec.triton_model != first_model:
                    self._unclaim(placed)
                    self._released()
                    raise NoReplicaError(f"no other replica of {first_model!r} can continue the stream")
            except QueueRefusal as exc:
                raise exhausted(str(exc), exc.retry_after_s) from exc
            except NoReplicaError as exc:
                raise MeshError(_no_replica_code(exc), f"{exc}{note}") from exc
            if (other := self._admitted(placed, route)) is not None:
                self._unclaim(placed)
                self._released()
                route = other
                continue
            replica = placed.replica
            first_model = first_model or placed.spec.triton_model
            # A batch request that waited its aging time out has had its turn coming: it runs to its end.
            if ticket.priority is Priority.BATCH and waited_s < self._admission_settings.aging_s(
                    ticket.deadline - asked_at):
                attempts.stoppable = self._preemption.track(placed.spec.triton_model, attempts.preempted)
            try:
                failure = await attempt(placed)
            except (asyncio.CancelledError, CallerGone):
                replica.breaker.abandon()  # the caller went away: no verdict on the replica
                raise
            finally:
                stoppable, attempts.stoppable = attempts.stoppable, None
                self._preemption.untrack(stoppable)
                if ticket.priority is Priority.INTERACTIVE and (held := self._admissions.get(
                        placed.spec.triton_model)) is not None:
                    held.interactive_ended()
                self._released()
            if failure is None:
                replica.breaker.record(grpc.StatusCode.OK)
                return placed
            if stoppable is not None and stoppable.preempted(failure[0]):
                replica.breaker.abandon()  # stopped by the router itself: no verdict on the replica
                attempts.preempted += 1
                if progress is not None and progress.started and not progress.resumable:
                    raise unavailable(f"{PREEMPTED_DETAIL}, and this model cannot resume a stream; retry"
                                      f"{self.progress_note(progress)}")
                continue  # back into the queue, behind the interactive request it made way for
            code, detail = _replica_failure(failure[0]), failure[1]
            replica.breaker.record(code, detail)
            if code in _FAILOVER_CODES:
                replica.mark_failed(f"{code.name}: {detail}")
            started = progress is not None and progress.started
            resumable = not started or progress.resumable
            if code in _FAILOVER_CODES and resumable and await self._retry(attempts.retries, code):
                attempts.retries += 1
                if started:
                    attempts.resumed += 1
                    log.warning("resuming a stream on another replica",
                                extra={"model": ask.public_name, "failed_replica": replica.name,
                                       "tokens_sent": progress.tokens_sent})
                route = route.excluding(replica.name)
                continue
            if started:
                RESUMED.labels(ask.public_name, "failed").inc()
            why = "" if resumable else "; this model cannot resume a stream on another replica"
            raise MeshError(code, f"replica {replica.name}: {detail}{why}{self.progress_note(progress)}")

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request on the stream is routed on its own and relayed concurrently, as Triton does."""
        responses: asyncio.Queue[Relayed | None] = asyncio.Queue()
        relays: set[asyncio.Task[None]] = set()
        keys = itertools.count()

        async def read_requests() -> None:
            async for request in request_iterator:
                relay = asyncio.create_task(self._relay_stream(request, context, Outbox(responses, next(keys))))
                relays.add(relay)
                relay.add_done_callback(relays.discard)
            while relays:
                await asyncio.gather(*list(relays), return_exceptions=True)
            await responses.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await responses.get()) is not None:
                if responses.empty():
                    yield item[1]
                    continue
                # The writer fell behind: what is ready goes out as one message per generation.
                ready = [item]
                while not responses.empty() and (item := responses.get_nowait()) is not None:
                    ready.append(item)
                for response in coalesced(ready):
                    yield response
                if item is None:
                    break
            await reader
        finally:
            for task in [reader, *relays]:
                task.cancel()
            await asyncio.gather(reader, *relays, return_exceptions=True)

    async def _relay_stream(self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext,
                            out: Outbox) -> None:
        public_name = request.model_name
        spec = self._state.registry.models.get(public_name)
        if spec is None:
            out.put(_error_response(not_found(self._unknown(public_name))))
            return
        ask = asked(request, tenant_of(context))
        progress = StreamProgress()
        attempts = Attempts()
        ticket = ticket_of(context, self.default_timeout_s)
        began = time.monotonic()

        async def relay(placed: Placed) -> tuple[grpc.StatusCode, str] | None:
            nonlocal began
            placed.aim(request)
            began = time.monotonic()
            attempt = progress.resume_request(request) if progress.started else request
            return await self._relay_attempt(attempt, public_name, placed, attempts, progress, context, out)

        try:
            await self.attempt_loop(spec, ask, ticket, attempts, relay, progress)
        except MeshError as error:
            out.put(_error_response(error))
            return
        if attempts.resumed:
            RESUMED.labels(public_name, "completed").inc()
        used = float(used_tokens(progress.last) if progress.last is not None else 0) or ticket.cost
        self.admission(spec).settle(ticket.tenant, ticket.weight, ticket.cost, used, time.monotonic() - began)

    @staticmethod
    def progress_note(progress: Progress | None) -> str:
        return f" (after {progress.responses} responses were sent)" if progress is not None and progress.started \
            else ""

    async def _relay_attempt(self, request: service_pb2.ModelInferRequest, public_name: str, placed: Placed,
                             attempts: Attempts, progress: StreamProgress, context: grpc.aio.ServicerContext,
                             out: Outbox) -> tuple[grpc.StatusCode, str] | None:
        """One replica's part of a stream: None when it ended with its final response, else why it failed."""
        replica = placed.replica
        call = replica.stub.ModelStreamInfer(iter([request]),
                                             timeout=downstream_timeout(context, self.default_timeout_s))
        if attempts.stoppable is not None:
            attempts.stoppable.stop = call.cancel
        try:
            with replica.track(placed.spec.triton_model, claimed=True):
                return await self._relay_responses(aiter(call), public_name, placed, attempts, progress, out)
        except asyncio.CancelledError:
            # grpc.aio raises this for a call cancelled locally: by preemption, unless this task itself is ending.
            if attempts.stoppable is None or not attempts.stoppable.requested or asyncio.current_task().cancelling():
                raise
            # Stopped after its final response went out: the request is answered, not to be run again.
            return None if progress.last is not None else (PREEMPTED_CODE, PREEMPTED_DETAIL)
        except TimeoutError:
            return grpc.StatusCode.UNAVAILABLE, f"no response for {self._stall_timeout_s:.0f} s"
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        finally:
            with contextlib.suppress(Exception):
                call.cancel()

    async def _relay_responses(self, stream: AsyncIterator[service_pb2.ModelStreamInferResponse], public_name: str,
                               placed: Placed, attempts: Attempts, progress: StreamProgress,
                               out: Outbox) -> tuple[grpc.StatusCode, str] | None:
        """Passes a replica's responses on until its final one. The first may wait in Triton's queue; after it
        tokens flow, or the replica stalled (TimeoutError). The stall deadline moves at most every tenth of the
        stall time, to between 1 and 1.1 stall times after the latest response: a timeout entered per token was
        a visible share of the router's Python time."""
        loop = asyncio.get_running_loop()
        window = self._stall_timeout_s
        async with asyncio.timeout(None) as stall:
            while True:
                try:
                    response = await anext(stream)
                except StopAsyncIteration:
                    return grpc.StatusCode.UNAVAILABLE, "the stream ended before its final response"
                if response.error_message:
                    out.put(response)  # the model refused or failed the request: not a replica fault
                    return None
                now = loop.time()
                deadline = stall.when()
                if deadline is None or now + window > deadline:
                    stall.reschedule(now + window * 1.1)
                final = is_final_response(response.infer_response)
                if final:
                    # Placement is read from the last response; stamping every token would cost for nothing.
                    _stamp(response.infer_response, public_name, placed, attempts)
                    ROUTED.labels(public_name, response.infer_response.model_version, placed.replica.pool,
                                  placed.replica.name).inc()
                progress.delivered(response.infer_response, final)
                out.put(response)
                if final:
                    stall.reschedule(None)
                    await read_to_end(stream)
                    return None

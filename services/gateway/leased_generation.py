"""Generation on a placement lease: the router places the request (admission, fair queue, breaker, replica, and
every retry or resume), and the stream flows from the granted Triton replica to this gateway with no relay
between them: one Python hop on the token path instead of two (ARCHITECTURE.md "The token path")."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, router_pb2, router_pb2_grpc
from services.common.channels import channel as mesh_channel
from services.common.errors import MeshError, from_stream_error, retry_after, unavailable
from services.common.internal_tls import InternalTls
from services.common.kserve import is_final_response, read_to_end, used_tokens
from services.common.placement import ServedBy, aim, stamp
from services.common.stream_progress import StreamProgress
from services.common.wire import AFFINITY_PARAMETER, PREEMPTED_DETAIL, SESSION_PARAMETER
from services.gateway.errors import from_rpc_error
from services.gateway.plan import RequestPlan

log = logging.getLogger(__name__)

_OK = grpc.StatusCode.OK.value[0]
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# How a lease call says it is over: its status, or (writing to a call already finished) grpc.aio's state error.
_LEASE_ENDED = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


class EngineChannels:
    """One channel per replica endpoint the router grants, dialled on first use with this process's internal
    certificate; the least recently used is closed past `limit` (replicas come and go with the registry)."""

    def __init__(self, tls: InternalTls | None, limit: int = 256) -> None:
        self._tls = tls
        self._limit = limit
        self._stubs: OrderedDict[tuple[str, str], tuple[grpc.aio.Channel, service_pb2_grpc.GRPCInferenceServiceStub]]
        self._stubs = OrderedDict()

    def stub(self, granted: router_pb2.LeaseGrant) -> service_pb2_grpc.GRPCInferenceServiceStub:
        key = (granted.endpoint, granted.authority)
        found = self._stubs.get(key)
        if found is None:
            channel = mesh_channel(granted.endpoint, self._tls, granted.authority)
            found = (channel, service_pb2_grpc.GRPCInferenceServiceStub(channel))
            self._stubs[key] = found
            while len(self._stubs) > self._limit:
                _, (old, _) = self._stubs.popitem(last=False)
                # Its calls in flight finish first: close() waits for none, so let them end on their own.
                asyncio.get_running_loop().call_later(600, lambda old=old: asyncio.ensure_future(old.close()))
        else:
            self._stubs.move_to_end(key)
        return found[1]

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel, _ in self._stubs.values()))


def lease_ask(request: service_pb2.ModelInferRequest, preemptible: bool = False) -> router_pb2.LeaseAsk:
    """What the router places on: the model, the version, the session and prefix keys, the inputs' names."""
    parameters = request.parameters
    return router_pb2.LeaseAsk(
        model=request.model_name, version=request.model_version,
        session=parameters[SESSION_PARAMETER].string_param if SESSION_PARAMETER in parameters else "",
        affinity_key=parameters[AFFINITY_PARAMETER].string_param if AFFINITY_PARAMETER in parameters else "",
        inputs=[tensor.name for tensor in request.inputs], preemptible=preemptible)


class Watch:
    """Reads the lease while a batch attempt streams from its replica: a preempt grant cancels the replica's call
    (the reader then reports the attempt ABORTED). Whatever else the lease says first (its end, an error) is kept
    for the next read of the lease, which goes through `next_read`: one read in flight at a time."""

    def __init__(self, lease: grpc.aio.StreamStreamCall, call: grpc.aio.Call) -> None:
        self._call: grpc.aio.Call | None = call
        self.preempted = False
        self._handed_over = False
        self._read: asyncio.Future = asyncio.ensure_future(lease.read())
        self._read.add_done_callback(self._heard)
        self._lease = lease

    def _heard(self, read: asyncio.Future) -> None:
        if read.cancelled() or read.exception() is not None:
            return
        granted = read.result()
        if granted is not grpc.aio.EOF and granted.preempt and self._call is not None:
            self.preempted = True
            self._call.cancel()

    def attempt_over(self) -> None:
        """The replica's call has ended (or delivered its final response): a preempt from now on is stale."""
        self._call = None

    async def next_read(self):
        """The lease's next message: the one this watch read (unless it was the preempt it acted on), else anew."""
        self.attempt_over()
        if self._handed_over or (self._read.done() and self.preempted):
            return await self._lease.read()
        self._handed_over = True
        return await self._read

    def close(self) -> None:
        if not self._read.done():
            self._read.cancel()
        elif not self._read.cancelled():
            self._read.exception()  # retrieved: an ended lease's error is not logged as never seen


def aimed(request: service_pb2.ModelInferRequest, granted: router_pb2.LeaseGrant) -> service_pb2.ModelInferRequest:
    aim(request, granted.triton_model, granted.triton_version, granted.spilled)
    return request


def stamped(response: service_pb2.ModelInferResponse, public_name: str,
            granted: router_pb2.LeaseGrant) -> service_pb2.ModelInferResponse:
    stamp(response, public_name, ServedBy(granted.pool, granted.replica, granted.model_version, granted.fallback,
                                          granted.retries, granted.resumed))
    return response


class _Stall:
    """Fails a stream whose replica goes silent after its first response: a timer looks every quarter of the stall
    time at how long the reader has been waiting (time spent handing a response to our own caller does not count),
    and cancels the call once it is the stall time. Per response this costs two attribute writes, not a timeout
    entered and left."""

    def __init__(self, call: grpc.aio.Call, stall_s: float) -> None:
        self._call = call
        self._stall_s = stall_s
        self._loop = asyncio.get_running_loop()
        self.waiting_since: float | None = None
        self.stalled = False
        self._timer: asyncio.TimerHandle | None = None

    def heard(self) -> None:
        """A response arrived: from now on silence counts (the first may wait in Triton's queue)."""
        if self._timer is None and self._stall_s > 0:
            self._timer = self._loop.call_later(self._stall_s / 4, self._look)

    def _look(self) -> None:
        since = self.waiting_since
        if since is not None and self._loop.time() - since >= self._stall_s:
            self.stalled = True
            self._call.cancel()
            return
        self._timer = self._loop.call_later(self._stall_s / 4, self._look)

    def now(self) -> float:
        return self._loop.time()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def refused(granted: router_pb2.LeaseGrant) -> MeshError:
    """The router's verdict, as the relay's in-stream error reads (with the retry-after hint when it shed)."""
    code = _CODES.get(granted.refused_code, grpc.StatusCode.UNKNOWN)
    return MeshError(code, granted.refused, retry_after(granted.retry_after_s) if granted.retry_after_s else ())


class Leased:
    """Generation streams placed by the router's lease and read from the granted replica."""

    def __init__(self, leases: router_pb2_grpc.PlacementLeasesStub, engines: EngineChannels) -> None:
        self._leases = leases
        self._engines = engines

    async def responses(self, request: service_pb2.ModelInferRequest,
                        plan: RequestPlan) -> AsyncIterator[service_pb2.ModelInferResponse]:
        public_name = request.model_name
        lease = None
        failed: router_pb2.AttemptReport | None = None  # an attempt's failure not yet delivered to the router
        watch: Watch | None = None  # a batch attempt's reader of the lease, for a preempt grant
        try:
            # Inside the try: an open breaker on the router's channel refuses the call here, with UNAVAILABLE.
            lease = self._leases.Lease(timeout=plan.timeout_s, metadata=plan.headers)
            preemptible = plan.priority == mesh_pb2.PRIORITY_BATCH
            await lease.write(router_pb2.LeaseReport(ask=lease_ask(request, preemptible)))
            progress = StreamProgress()
            deadline = asyncio.get_running_loop().time() + plan.timeout_s
            while True:
                granted = await (watch.next_read() if watch is not None else lease.read())
                if granted is not grpc.aio.EOF and granted.preempt:
                    continue  # meant for an attempt that had already ended
                if granted is grpc.aio.EOF:
                    if failed is not None:
                        raise _attempt_error(failed)
                    raise unavailable("router: the lease ended without a placement")
                failed = None
                if granted.refused_code:
                    raise refused(granted)
                attempt = aimed(progress.resume_request(request) if progress.started else request, granted)
                call = self._engines.stub(granted).ModelStreamInfer(
                    iter([attempt]), timeout=max(deadline - asyncio.get_running_loop().time(), 0.001))
                stall = _Stall(call, granted.stall_timeout_s)
                watch = Watch(lease, call) if preemptible else None
                report = router_pb2.AttemptReport()
                try:
                    stream = aiter(call)
                    while True:
                        stall.waiting_since = stall.now()
                        try:
                            item = await anext(stream)
                        except StopAsyncIteration:
                            report.code = grpc.StatusCode.UNAVAILABLE.value[0]
                            report.detail = "the stream ended before its final response"
                            break
                        stall.waiting_since = None
                        if item.error_message:  # the model refused or failed the request: not the replica's fault
                            await self._settle(lease, report, progress, 0, "")
                            raise from_stream_error(item.error_message)
                        response = item.infer_response
                        final = is_final_response(response)
                        progress.delivered(response, final)
                        if final:
                            if watch is not None:
                                watch.attempt_over()
                            await read_to_end(stream)
                            await self._settle(lease, report, progress, used_tokens(response),
                                               response.model_version, watch)
                            yield stamped(response, public_name, granted)
                            return
                        stall.heard()
                        yield response
                except grpc.aio.AioRpcError as exc:
                    code, detail = exc.code(), exc.details() or ""
                    if watch is not None and watch.preempted:
                        code, detail = grpc.StatusCode.ABORTED, PREEMPTED_DETAIL
                    elif code == grpc.StatusCode.CANCELLED:
                        # Cancelled by the replica's side: the replica went away (the router reads it the same way).
                        code = grpc.StatusCode.UNAVAILABLE
                    report.code, report.detail = code.value[0], detail
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise
                    if watch is not None and watch.preempted:
                        report.code = grpc.StatusCode.ABORTED.value[0]
                        report.detail = PREEMPTED_DETAIL
                    elif stall.stalled:
                        report.code = grpc.StatusCode.UNAVAILABLE.value[0]
                        report.detail = f"no response for {granted.stall_timeout_s:.0f} s"
                    else:
                        raise
                finally:
                    stall.stop()
                    call.cancel()
                    if watch is not None:
                        watch.attempt_over()
                _fill(report, progress)
                report.replica = granted.replica
                failed = report
                await lease.write(router_pb2.LeaseReport(outcome=report))
        except _LEASE_ENDED as exc:
            if failed is not None:
                # The lease ended (its deadline, the router gone) before its verdict on a failed attempt: the
                # attempt's own failure is what the caller should hear, as the relay would have said it.
                raise _attempt_error(failed) from exc
            if isinstance(exc, grpc.aio.AioRpcError):
                raise from_rpc_error(exc, "router") from exc
            raise unavailable(f"router: the lease ended early ({(await lease.code()).name})") from exc
        finally:
            if watch is not None:
                watch.close()
            if lease is not None:
                lease.cancel()

    @staticmethod
    async def _settle(lease: grpc.aio.StreamStreamCall, report: router_pb2.AttemptReport, progress: StreamProgress,
                      used_tokens: int, model_version: str, watch: Watch | None = None) -> None:
        """The attempt succeeded: report it, and wait for the router to have settled the lease (cancelling it
        earlier would read as the caller gone, with no verdict for the replica's breaker)."""
        report.code, report.used_tokens, report.model_version = _OK, used_tokens, model_version
        _fill(report, progress)
        try:
            await lease.write(router_pb2.LeaseReport(outcome=report))
            await lease.done_writing()
            if watch is not None and await watch.next_read() is grpc.aio.EOF:
                return
            while await lease.read() is not grpc.aio.EOF:
                pass
        except _LEASE_ENDED as exc:
            # The answer is whole: a router that went away meanwhile took its slot count with it, and the caller
            # still gets every token it was streamed (with the relay, the router's death cut the stream).
            log.warning("the router went away before a lease was settled", extra={"error": repr(exc)})


def _attempt_error(report: router_pb2.AttemptReport) -> MeshError:
    return MeshError(_CODES.get(report.code, grpc.StatusCode.UNKNOWN), f"replica {report.replica}: {report.detail}")


def _fill(report: router_pb2.AttemptReport, progress: StreamProgress) -> None:
    report.responses, report.tokens, report.resumable = progress.responses, progress.tokens_sent, progress.resumable

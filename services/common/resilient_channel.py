"""A gRPC client channel to one downstream service with its circuit breaker and retries built in.

Every call is admitted by the target's breaker (an open one fails fast with UNAVAILABLE and says why) and its
outcome recorded. Unary calls to methods named idempotent are retried on UNAVAILABLE with backoff and jitter,
within the caller's deadline and the target's retry budget. Streams are not retried here: only the caller knows
whether anything was produced yet (see the gateway's generation and the router's relay).

While the breaker is open, a grpc.health.v1 check runs at most once per `probe_interval_s`; a SERVING answer
half-opens it, so a restarted service gets traffic again within seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.background import BackgroundCalls
from services.common.breakers import Breaker, BreakerOpenError
from services.common.resilience import ResilienceSettings
from services.common.retries import Retrier
from services.common.server import CHANNEL_OPTIONS
from services.common.telemetry import client_interceptors

_HEALTH_METHOD = "/grpc.health.v1.Health/Check"
# Per target, the unary methods that may be sent twice without harm (reads, or writes keyed by the caller).
# The cache is not retried at all: a slow cache is skipped (the request degrades), never waited for.
IDEMPOTENT_METHODS: dict[str, frozenset[str]] = {
    "router": frozenset({"ModelInfer", "ModelMetadata", "ModelReady", "ModelConfig", "ServerReady", "ServerLive",
                         "ListModels", "ListReplicas", "ListPools"}),
    "retrieval": frozenset({"Search", "CollectionStats", "DeleteDocuments"}),
    "budget": frozenset({"Check"}),
}
# A retry needs at least this much of the caller's deadline left to be worth sending.
_MIN_ATTEMPT_S = 0.01


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


def unavailable(message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=message)


class ResilienceInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                            grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, breaker: Breaker, retrier: Retrier, idempotent_methods: Iterable[str],
                 probe_interval_s: float = 1.0) -> None:
        self.breaker = breaker
        self.retrier = retrier
        # Short names, e.g. "Search": the last part of "/pkg.Service/Search".
        self._idempotent = frozenset(idempotent_methods)
        self._probe_interval_s = probe_interval_s
        self._last_probe = 0.0
        self._health: health_pb2_grpc.HealthStub | None = None
        self._background = BackgroundCalls()

    def attach(self, channel: grpc.aio.Channel) -> None:
        self._health = health_pb2_grpc.HealthStub(channel)

    def _admit(self, method: str) -> None:
        if method == _HEALTH_METHOD:
            return
        try:
            self.breaker.admit()
        except BreakerOpenError as exc:
            self._maybe_probe()
            raise unavailable(str(exc)) from None

    def _maybe_probe(self) -> None:
        now = time.monotonic()
        if self._health is None or now - self._last_probe < self._probe_interval_s:
            return
        self._last_probe = now
        self._background.start(self._probe())

    async def _probe(self) -> None:
        try:
            answer = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=self._probe_interval_s)
        except grpc.aio.AioRpcError:
            return
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            self.breaker.healthy()

    def _record(self, method: str, code: grpc.StatusCode | None, details: str = "") -> None:
        if method != _HEALTH_METHOD:
            self.breaker.record(code, details)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = _method_name(client_call_details)
        retryable = method.rsplit("/", 1)[-1] in self._idempotent
        deadline = None if client_call_details.timeout is None else time.monotonic() + client_call_details.timeout
        self.retrier.budget.on_request()
        retry = 0
        details = client_call_details
        while True:
            self._admit(method)
            call = await continuation(details, request)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                self._record(method, exc.code(), exc.details() or "")
                if not retryable:
                    raise
                pause = self.retrier.backoff_s(retry)
                left = None if deadline is None else deadline - time.monotonic() - pause
                if (left is not None and left < _MIN_ATTEMPT_S) or not self.retrier.may_retry(retry, exc.code()):
                    raise
                await asyncio.sleep(pause)
                retry += 1
                details = details._replace(timeout=left)
                continue
            except asyncio.CancelledError:
                self.breaker.abandon()
                raise
            self._record(method, grpc.StatusCode.OK)
            return call

    def _watch(self, method: str, call) -> None:
        if method == _HEALTH_METHOD:
            return

        async def record_when_done() -> None:
            code = await call.code()
            if code == grpc.StatusCode.CANCELLED:
                self.breaker.abandon()
            else:
                self._record(method, code, await call.details() or "")

        call.add_done_callback(lambda _call: self._background.start(record_when_done()))

    async def _stream(self, continuation, client_call_details, request_or_iterator):
        method = _method_name(client_call_details)
        self._admit(method)
        call = await continuation(client_call_details, request_or_iterator)
        self._watch(method, call)
        return call

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._stream(continuation, client_call_details, request)

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._stream(continuation, client_call_details, request_iterator)


def resilient_channel(address: str, target: str, settings: ResilienceSettings) -> grpc.aio.Channel:
    """A channel to `address` whose calls go through the breaker and retries of `target` (e.g. "cache")."""
    interceptor = ResilienceInterceptor(settings.breaker(target), settings.retrier(target),
                                        IDEMPOTENT_METHODS.get(target, frozenset()))
    # Tracing outside the breaker and retries: one client span per call, whatever it took.
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                        interceptors=[*client_interceptors(), interceptor])
    interceptor.attach(channel)
    return channel

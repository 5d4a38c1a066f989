"""A gRPC client channel to one downstream service with its circuit breaker and retries built in.

Every call is admitted by the target's breaker (an open one fails fast with UNAVAILABLE and says why) and its
outcome recorded. Unary calls to methods named idempotent are retried on UNAVAILABLE with backoff and jitter,
within the caller's deadline and the target's retry budget. Streams are not retried here: only the caller knows
whether anything was produced yet (see the gateway's generation and the router's relay).

While the breaker is open, a grpc.health.v1 check runs at most once per `probe_interval_s`; a SERVING answer
half-opens it, so a restarted service gets traffic again within seconds.

It wraps the channel's multicallables (what generated stubs are built from) rather than using grpc.aio client
interceptors: those run every call in an extra task, which cost cache hits 10-30% of their throughput on two
cores. A unary call here is a coroutine (callers await it); a stream is the channel's own call object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.background import BackgroundCalls
from services.common.breakers import Breaker, BreakerOpenError
from services.common.channels import channel as mesh_channel
from services.common.internal_tls import InternalTls
from services.common.resilience import ResilienceSettings
from services.common.retries import Retrier

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


def unavailable(message: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=message)


class Guard:
    """The breaker, retry budget and health probe of one target, shared by every method of its channel."""

    def __init__(self, breaker: Breaker, retrier: Retrier, idempotent_methods: Iterable[str],
                 probe_interval_s: float = 1.0) -> None:
        self.breaker = breaker
        self.retrier = retrier
        # Short names, e.g. "Search": the last part of "/pkg.Service/Search".
        self.idempotent = frozenset(idempotent_methods)
        self._probe_interval_s = probe_interval_s
        self._last_probe = 0.0
        self._health: health_pb2_grpc.HealthStub | None = None
        self._background = BackgroundCalls()

    def attach(self, channel: grpc.aio.Channel) -> None:
        self._health = health_pb2_grpc.HealthStub(channel)

    def admit(self) -> None:
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

    def watch(self, call: Any) -> None:
        """Records a stream's outcome when it ends (a caller's cancel is no verdict on the target)."""
        async def record_when_done() -> None:
            code = await call.code()
            if code == grpc.StatusCode.CANCELLED:
                self.breaker.abandon()
            else:
                self.breaker.record(code, await call.details() or "")

        call.add_done_callback(lambda _call: self._background.start(record_when_done()))


class _Unary:
    """A unary-unary (or stream-unary) method: the call is a coroutine with breaker, retries and budget."""

    def __init__(self, guard: Guard, inner: Any, method: str, retryable: bool) -> None:
        self._guard = guard
        self._inner = inner
        self._retryable = retryable
        self._method = method

    def __call__(self, request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._invoke(request, timeout, kwargs)

    async def _invoke(self, request: Any, timeout_s: float | None, kwargs: dict[str, Any]) -> Any:
        guard, retrier = self._guard, self._guard.retrier
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        retrier.budget.on_request()
        retry = 0
        while True:
            guard.admit()
            try:
                response = await self._inner(request, timeout=timeout_s, **kwargs)
            except grpc.aio.AioRpcError as exc:
                guard.breaker.record(exc.code(), exc.details() or "")
                if not self._retryable:
                    raise
                pause = retrier.backoff_s(retry)
                left = None if deadline is None else deadline - time.monotonic() - pause
                if (left is not None and left < _MIN_ATTEMPT_S) or not retrier.may_retry(retry, exc.code()):
                    raise
                await asyncio.sleep(pause)
                retry += 1
                timeout_s = left
                continue
            except asyncio.CancelledError:
                guard.breaker.abandon()
                raise
            guard.breaker.record(grpc.StatusCode.OK)
            return response


class _Stream:
    """A unary-stream or stream-stream method: admitted by the breaker, its outcome recorded when it ends."""

    def __init__(self, guard: Guard, inner: Any) -> None:
        self._guard = guard
        self._inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._guard.admit()
        call = self._inner(*args, **kwargs)
        self._guard.watch(call)
        return call


class ResilientChannel:
    """Stands in for a grpc.aio.Channel when building stubs; everything else goes to the real channel."""

    def __init__(self, channel: grpc.aio.Channel, guard: Guard) -> None:
        self._channel = channel
        self.guard = guard

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.unary_unary(method, *args, **kwargs)
        if method == _HEALTH_METHOD:
            return inner  # the probe itself: never blocked by the breaker it informs
        return _Unary(self.guard, inner, method, method.rsplit("/", 1)[-1] in self.guard.idempotent)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unary(self.guard, self._channel.stream_unary(method, *args, **kwargs), method, retryable=False)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Stream(self.guard, self._channel.unary_stream(method, *args, **kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Stream(self.guard, self._channel.stream_stream(method, *args, **kwargs))

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def resilient_channel(address: str, target: str, settings: ResilienceSettings,
                      tls: InternalTls | None = None) -> ResilientChannel:
    """A channel to `address` whose calls go through the breaker and retries of `target` (e.g. "cache")."""
    channel = mesh_channel(address, tls)
    guard = Guard(settings.breaker(target), settings.retrier(target), IDEMPOTENT_METHODS.get(target, frozenset()))
    guard.attach(channel)
    return ResilientChannel(channel, guard)

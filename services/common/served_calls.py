"""Every RPC a service serves, wrapped once: admission by the load shedder (when the service has one), then
requests and durations by method and status code (Prometheus). Health checks and reflection are neither shed
nor counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from services.common.handler_wrapping import HandlerInterceptor, Stream, Unary
from services.common.shedding import LoadShedder

REQUESTS = Counter("mesh_rpc_requests_total", "RPCs served, by service, method and status code",
                   ["service", "method", "code"])
# Streams are measured to their end; buckets reach the 60 s inference timeout.
DURATION = Histogram("mesh_rpc_duration_seconds", "Time to serve an RPC (to the last message of a stream)",
                     ["service", "method"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1, 2.5, 5, 10, 30, 60))
_EXEMPT = ("/grpc.health.v1.", "/grpc.reflection.")


def _code(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if code is None:
        if isinstance(failed, (asyncio.CancelledError, GeneratorExit)):
            return "CANCELLED"  # the caller went away
        return "UNKNOWN" if failed is not None else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name


class ServedCalls(HandlerInterceptor):
    def __init__(self, service: str, shedder: LoadShedder | None = None) -> None:
        super().__init__()
        self._service = service
        self.shedder = shedder
        self._counters: dict[tuple[str, str], Any] = {}
        self._timers: dict[str, Any] = {}

    async def _admit(self, context: grpc.aio.ServicerContext, method: str) -> str | None:
        """The party the place is held for (see LoadShedder). A refused call is counted with its status
        (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) and not timed."""
        if self.shedder is None:
            return None
        try:
            return await self.shedder.admit(context)
        except BaseException as exc:
            REQUESTS.labels(self._service, method, _code(context, exc)).inc()
            raise

    def _observe(self, method: str, context: grpc.aio.ServicerContext, started: float,
                 failed: BaseException | None, party: str | None) -> None:
        if self.shedder is not None:
            self.shedder.release(party)
        code = _code(context, failed)
        # Children looked up once: labels() takes a lock and builds a key on every call.
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = REQUESTS.labels(self._service, method, code)
        timer = self._timers.get(method)
        if timer is None:
            timer = self._timers[method] = DURATION.labels(self._service, method)
        counter.inc()
        timer.observe(time.perf_counter() - started)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return handler if method.startswith(_EXEMPT) else super().wrap(handler, method.rsplit("/", 1)[-1])

    def around_unary(self, inner: Unary, method: str) -> Unary:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, failed = time.perf_counter(), None
            party = await self._admit(context, method)
            try:
                return await inner(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._observe(method, context, started, failed, party)
        return unary

    def around_stream(self, inner: Stream, method: str) -> Stream:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, failed = time.perf_counter(), None
            party = await self._admit(context, method)
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._observe(method, context, started, failed, party)
        return stream

"""Load shedding: a bound on the RPCs a process works on at once; beyond it RESOURCE_EXHAUSTED at once, with a
retry-after hint, instead of an unbounded queue. Calls whose deadline has (nearly) passed are refused before any
work starts. Health checks and reflection are never shed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
SHED = Counter("mesh_shed_requests_total", "Requests refused at once, by service and reason", ["service", "reason"])
IN_FLIGHT = Gauge("mesh_in_flight_requests", "RPCs being worked on", ["service"])


class LoadShedder(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, max_in_flight: int, min_deadline_s: float = 0.01) -> None:
        self._service = service
        self._max = max_in_flight
        self._min_deadline_s = min_deadline_s
        self.in_flight = 0

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining < self._min_deadline_s:
            SHED.labels(self._service, "deadline").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the deadline leaves {max(remaining, 0) * 1000:.0f} ms: too little to start")
        if self.in_flight >= self._max:
            SHED.labels(self._service, "capacity").inc()
            context.set_trailing_metadata((("retry-after", "1"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._service} at capacity ({self._max} requests in flight); retry with backoff")
        self.in_flight += 1
        IN_FLIGHT.labels(self._service).set(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        IN_FLIGHT.labels(self._service).set(self.in_flight)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary or handler.stream_unary:
            field = "unary_unary" if handler.unary_unary else "stream_unary"
            inner: Callable[..., Awaitable[Any]] = getattr(handler, field)

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._admit(context)
                try:
                    return await inner(request, context)
                finally:
                    self._release()
            return handler._replace(**{field: unary})
        field = "unary_stream" if handler.unary_stream else "stream_stream"
        inner_stream: Callable[..., AsyncIterator[Any]] = getattr(handler, field)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._admit(context)
            try:
                async for response in inner_stream(request, context):
                    yield response
            finally:
                self._release()
        return handler._replace(**{field: stream})

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not hasattr(handler, "_replace") or \
                handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        return self._wrap(handler)

"""A base for server interceptors that put something around every handler: the unary and streaming shapes of
grpc.aio handlers told apart in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Stream = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Subclasses return the wrapped behaviour of a unary call (unary or client-streaming request) and of a
    streamed reply (server- or bidi-streaming). A method's wrapped handler is made once and reused: the wrapper
    keeps no per-call state, and grpc asks for the handler on every call."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def around_unary(self, inner: Unary, method: str) -> Unary:
        return inner

    def around_stream(self, inner: Stream, method: str) -> Stream:
        return inner

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self.wrap(handler, method)
        # Keyed by registered methods only (an unknown method has no handler): bounded by the service's API.
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler with its behaviour wrapped (override to change more of it, e.g. its deserializer)."""
        if handler.unary_unary or handler.stream_unary:
            field = "unary_unary" if handler.unary_unary else "stream_unary"
            return handler._replace(**{field: self.around_unary(getattr(handler, field), method)})
        field = "unary_stream" if handler.unary_stream else "stream_stream"
        return handler._replace(**{field: self.around_stream(getattr(handler, field), method)})

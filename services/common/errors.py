"""The mesh's one error model: `MeshError` carries the gRPC status a caller gets, raised wherever the problem is
found; one server interceptor answers it for every servicer (unary and streaming alike), so no helper needs a
context to abort with. Errors that travel inside a KServe stream (`error_message`) have one writer and one
reader here as well.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class MeshError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Trailing metadata for the caller, e.g. a retry-after hint on RESOURCE_EXHAUSTED.
        self.trailing = trailing


def invalid(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.UNAVAILABLE, message)


# Codes a stream error may name; anything else from a model is its own failure (INTERNAL).
_STREAM_CODES = {code.name: code for code in (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED)}


def stream_error_text(code: grpc.StatusCode, detail: str) -> str:
    """The error_message of a KServe stream response: "CODE: detail" (the LLM model writes the same form)."""
    return f"{code.name}: {detail}"


def from_stream_error(text: str) -> MeshError:
    """The status a stream's error_message names (see stream_error_text)."""
    name, separator, detail = text.partition(": ")
    if separator and name in _STREAM_CODES:
        return MeshError(_STREAM_CODES[name], detail)
    return MeshError(grpc.StatusCode.INTERNAL, f"model error: {text}")


class AnswersMeshErrors(grpc.aio.ServerInterceptor):
    """Turns a MeshError raised by any handler into its status, with its message and trailing metadata."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        if handler.unary_unary or handler.stream_unary:
            field = "unary_unary" if handler.unary_unary else "stream_unary"
            inner: Callable[..., Awaitable[Any]] = getattr(handler, field)

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except MeshError as exc:
                    await context.abort(exc.code, exc.message, exc.trailing)
            return handler._replace(**{field: unary})
        field = "unary_stream" if handler.unary_stream else "stream_stream"
        inner_stream: Callable[..., AsyncIterator[Any]] = getattr(handler, field)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in inner_stream(request, context):
                    yield response
            except MeshError as exc:
                await context.abort(exc.code, exc.message, exc.trailing)
        return handler._replace(**{field: stream})

"""The mesh's one error model: `MeshError` carries the gRPC status a caller gets, raised wherever the problem is
found; one server interceptor answers it for every servicer (unary and streaming alike), so no helper needs a
context to abort with. Errors that travel inside a KServe stream (`error_message`) have one writer and one
reader here as well.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common.handler_wrapping import HandlerInterceptor, Stream, Unary


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


def from_stream_error(text: str, retry_after_s: float = 0.0) -> MeshError:
    """The status a stream's error_message names (see stream_error_text), with a retry-after hint when the
    writer gave one."""
    name, separator, detail = text.partition(": ")
    trailing = (("retry-after", str(max(1, math.ceil(retry_after_s)))),) if retry_after_s > 0 else ()
    if separator and name in _STREAM_CODES:
        return MeshError(_STREAM_CODES[name], detail, trailing)
    return MeshError(grpc.StatusCode.INTERNAL, f"model error: {text}")


class AnswersMeshErrors(HandlerInterceptor):
    """Turns a MeshError raised by any handler into its status, with its message and trailing metadata."""

    def around_unary(self, inner: Unary, method: str) -> Unary:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except MeshError as exc:
                await context.abort(exc.code, exc.message, exc.trailing)
        return unary

    def around_stream(self, inner: Stream, method: str) -> Stream:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in inner(request, context):
                    yield response
            except MeshError as exc:
                await context.abort(exc.code, exc.message, exc.trailing)
        return stream

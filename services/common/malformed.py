"""Malformed request bytes get INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc.aio answers a request that does not parse as its protobuf type (bit flips, truncation, invalid UTF-8 in a
string field) with UNKNOWN "Unexpected DecodeError". This interceptor wraps every handler's deserializer so the
caller gets INVALID_ARGUMENT naming the method, and the servicer never sees the bad message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import abort, invalid
from services.common.handler_wrapping import HandlerInterceptor


class Malformed:
    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return Malformed(str(exc))
    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, method: str, bad: Malformed) -> None:
    await abort(context, invalid(f"the request is not a valid message for {method}: {bad.error}"))


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                   method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            await _refuse(context, method, request)
        yield request


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await _refuse(context, method, request)
            return await inner(request, context)
        return handler._replace(request_deserializer=_safe(handler.request_deserializer), unary_unary=unary_unary)
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _refuse(context, method, request)
            async for response in inner_stream(request, context):
                yield response
        return handler._replace(request_deserializer=_safe(handler.request_deserializer), unary_stream=unary_stream)
    if handler.stream_unary:
        inner_unary = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await inner_unary(_checked(requests, context, method), context)
        return handler._replace(request_deserializer=_safe(handler.request_deserializer), stream_unary=stream_unary)
    inner_bidi = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in inner_bidi(_checked(requests, context, method), context):
            yield response
    return handler._replace(request_deserializer=_safe(handler.request_deserializer), stream_stream=stream_stream)


class MalformedRequestInterceptor(HandlerInterceptor):
    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _wrap(handler, method)

"""The mesh's one error model: `MeshError` carries the gRPC status a caller gets, raised wherever the problem is
found; one server interceptor answers it for every servicer (unary and streaming alike), so no helper needs a
context to abort with. Errors that travel inside a KServe stream (`error_message`) have one writer and one
reader here as well.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc

from services.common.handler_wrapping import HandlerInterceptor, Stream, Unary

log = logging.getLogger(__name__)
# The request a task serves (the gateway's request id, carried to every hop in x-request-id): what a caller quotes
# and what every service's log lines carry.
REQUEST_ID: ContextVar[str] = ContextVar("mesh_request_id", default="")
_REQUEST_ID_SHAPE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class MeshError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Trailing metadata for the caller, e.g. a retry-after hint on RESOURCE_EXHAUSTED.
        self.trailing = trailing


def retry_after(seconds: float) -> tuple[tuple[str, str], ...]:
    """The retry-after hint a caller gets, in whole seconds (at least 1: "0" would invite a retry storm)."""
    return (("retry-after", str(max(1, math.ceil(seconds)))),)


def invalid(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str, retry_after_s: float | None = None) -> MeshError:
    return MeshError(grpc.StatusCode.UNAVAILABLE, message, retry_after(retry_after_s) if retry_after_s else ())


def exhausted(message: str, retry_after_s: float | None = None) -> MeshError:
    """RESOURCE_EXHAUSTED (HTTP 429): a limit the caller may wait out, with when to try again."""
    return MeshError(grpc.StatusCode.RESOURCE_EXHAUSTED, message,
                     retry_after(retry_after_s) if retry_after_s is not None else ())


def not_found(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.NOT_FOUND, message)


def already_exists(message: str) -> MeshError:
    """ALREADY_EXISTS (HTTP 409): a create that names what is there (the admin API's tenants)."""
    return MeshError(grpc.StatusCode.ALREADY_EXISTS, message)


def failed_precondition(message: str) -> MeshError:
    """FAILED_PRECONDITION: the request is sound but the state it acts on forbids it (a revoked key rotated)."""
    return MeshError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unauthenticated(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.UNAUTHENTICATED, message)


def denied(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.PERMISSION_DENIED, message)


def too_late(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def unimplemented(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.UNIMPLEMENTED, message)


def bug(message: str) -> MeshError:
    """INTERNAL: the mesh broke its own contract (never a caller's mistake, never a dependency's outage)."""
    return MeshError(grpc.StatusCode.INTERNAL, message)


async def abort(context: grpc.aio.ServicerContext, error: MeshError) -> NoReturn:
    """Answers `error` from where no MeshError can be raised to the answering interceptor (the interceptors that
    run before it: shedding, caller identity, malformed messages). The one place a context is aborted."""
    await context.abort(error.code, error.message, error.trailing)
    raise AssertionError("context.abort returned")  # it raises; this keeps NoReturn honest


def is_plain_request_id(value: str) -> bool:
    """Safe in a header and a log line: what a caller-chosen id must be before the mesh carries it on."""
    return bool(_REQUEST_ID_SHAPE.match(value))


def adopt_request_id(metadata) -> None:
    """The x-request-id a call carries becomes this task's (ignored unless it is a plain id: it goes into logs);
    none: the task's is cleared (an HTTP connection's task serves one request after another)."""
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and is_plain_request_id(value):
            REQUEST_ID.set(value)
            return
    REQUEST_ID.set("")


def internal_failure(public: str, detail: BaseException | str,
                     code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> MeshError:
    """What a caller is told of a failure inside the mesh: what failed and the request id to find it by. The
    detail (a dependency's own words: Milvus, Redis, a traceback) is logged here, never sent: it can name
    hosts, collections, keys or code."""
    reference = REQUEST_ID.get() or uuid.uuid4().hex
    log.warning("internal failure", extra={"request_id": reference, "failure": public, "detail": str(detail)[:2000]})
    return MeshError(code, f"{public}; request id {reference} (the detail is in the mesh's logs)")


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
    trailing = retry_after(retry_after_s) if retry_after_s > 0 else ()
    if separator and name in _STREAM_CODES:
        return MeshError(_STREAM_CODES[name], detail, trailing)
    return MeshError(grpc.StatusCode.INTERNAL, f"model error: {text}")


def _unexpected(exc: Exception, method: str) -> MeshError:
    log.error("unexpected error", exc_info=exc, extra={"method": method, "request_id": REQUEST_ID.get()})
    return internal_failure(f"{method} failed inside the mesh", f"{type(exc).__name__}: {exc}",
                            grpc.StatusCode.INTERNAL)


class AnswersMeshErrors(HandlerInterceptor):
    """Turns a MeshError raised by any handler into its status, with its message and trailing metadata; anything
    else is a bug, answered INTERNAL with the request id (grpc would send the exception's own text)."""

    def around_unary(self, inner: Unary, method: str) -> Unary:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            adopt_request_id(context.invocation_metadata())
            try:
                return await inner(request, context)
            except MeshError as exc:
                await abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, _unexpected(exc, method))
        return unary

    def around_stream(self, inner: Stream, method: str) -> Stream:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            adopt_request_id(context.invocation_metadata())
            try:
                async for response in inner(request, context):
                    yield response
            except MeshError as exc:
                await abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, _unexpected(exc, method))
        return stream

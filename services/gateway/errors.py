"""Request errors carry the gRPC status the caller should get."""

from __future__ import annotations

import grpc

# Tag that the LLM model puts on errors the caller caused (see triton_models/smollm2/1/model.py).
MODEL_INVALID_ARGUMENT = "INVALID_ARGUMENT: "


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Trailing metadata for the caller, e.g. a retry-after hint on RESOURCE_EXHAUSTED.
        self.trailing = trailing


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def from_stream_error(message: str) -> RequestError:
    """Map a KServe stream error_message (from the router or the model) to a status."""
    if message.startswith(MODEL_INVALID_ARGUMENT):
        return invalid(message[len(MODEL_INVALID_ARGUMENT):])
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
        if message.startswith(f"{code.name}: "):
            return RequestError(code, message[len(code.name) + 2:])
    return RequestError(grpc.StatusCode.INTERNAL, f"model error: {message}")


def from_rpc_error(exc: grpc.aio.AioRpcError, hop: str) -> RequestError:
    code = exc.code()
    if code == grpc.StatusCode.CANCELLED:
        code = grpc.StatusCode.UNAVAILABLE
    return RequestError(code, f"{hop}: {exc.details()}")

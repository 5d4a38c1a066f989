"""Errors of the gateway's downstream calls, as the caller's status (services/common/errors.py is the model)."""

from __future__ import annotations

import grpc

from services.common.errors import MeshError, internal_failure

# A hop's own failures (a bug, lost data): their text is the hop's internals, not something a caller can act on.
_INTERNAL_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)


def from_rpc_error(exc: grpc.aio.AioRpcError, hop: str) -> MeshError:
    """A downstream call's failure; a cancelled one means the hop went away (UNAVAILABLE), not the caller."""
    code = exc.code()
    if code == grpc.StatusCode.CANCELLED:
        code = grpc.StatusCode.UNAVAILABLE
    if code in _INTERNAL_CODES:
        return internal_failure(f"{hop} failed", f"{code.name}: {exc.details()}", code)
    return MeshError(code, f"{hop}: {exc.details()}")

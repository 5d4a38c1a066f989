"""Errors of the gateway's downstream calls, as the caller's status (services/common/errors.py is the model)."""

from __future__ import annotations

import grpc

from services.common.errors import MeshError


def from_rpc_error(exc: grpc.aio.AioRpcError, hop: str) -> MeshError:
    """A downstream call's failure; a cancelled one means the hop went away (UNAVAILABLE), not the caller."""
    code = exc.code()
    if code == grpc.StatusCode.CANCELLED:
        code = grpc.StatusCode.UNAVAILABLE
    return MeshError(code, f"{hop}: {exc.details()}")

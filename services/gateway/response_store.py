"""The Responses API's stored responses, kept by the cache service (StoredResponses) under the caller's tenant.
The gateway makes the ids; an id a caller sends is parsed before it goes anywhere."""

from __future__ import annotations

import re
import secrets

import grpc

from inference_mesh.v1 import cache_pb2, cache_pb2_grpc
from services.common.errors import unavailable

_ID = re.compile(r"^resp_[0-9a-f]{24}$")


def new_response_id() -> str:
    return f"resp_{secrets.token_hex(12)}"


def is_response_id(text: str) -> bool:
    return bool(_ID.match(text))


class ResponseStore:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._stub = cache_pb2_grpc.StoredResponsesStub(channel)
        self._timeout_s = timeout_s

    async def _call(self, what: str, call):
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise unavailable(f"the response store could not {what} ({exc.code().name}); retry, or send store "
                              "false and the conversation in input", retry_after_s=1) from exc

    async def put(self, tenant: str, response: cache_pb2.StoredResponse) -> None:
        await self._call("keep the response", self._stub.PutResponse(
            cache_pb2.PutResponseRequest(tenant=tenant, response=response), timeout=self._timeout_s))

    async def get(self, tenant: str, response_id: str) -> cache_pb2.StoredResponse | None:
        if not is_response_id(response_id):
            return None
        reply = await self._call("read the response", self._stub.GetResponse(
            cache_pb2.GetResponseRequest(tenant=tenant, id=response_id), timeout=self._timeout_s))
        return reply.response if reply.found else None

    async def delete(self, tenant: str, response_id: str) -> bool:
        if not is_response_id(response_id):
            return False
        reply = await self._call("delete the response", self._stub.DeleteResponse(
            cache_pb2.DeleteResponseRequest(tenant=tenant, id=response_id), timeout=self._timeout_s))
        return reply.deleted

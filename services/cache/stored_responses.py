"""The Responses API's stored responses, one Redis key per (tenant, id) with a TTL. The tenant comes from the
gateway, which took it from the caller's credential; an id is parsed (resp_ and 24 hex digits) before it is part
of a key, so another tenant's id, or any other string, finds nothing."""

from __future__ import annotations

import grpc

from inference_mesh.v1 import cache_pb2, cache_pb2_grpc
from services.cache.keys import STORED_RESPONSE_ID, stored_response_key
from services.cache.store import RedisStore
from services.common.errors import invalid


def _key(tenant: str, response_id: str) -> str:
    if not tenant or not STORED_RESPONSE_ID.match(response_id):
        raise invalid("a stored response is named by its tenant and an id resp_<24 hex digits>")
    return stored_response_key(tenant, response_id)


class StoredResponsesService(cache_pb2_grpc.StoredResponsesServicer):
    def __init__(self, store: RedisStore, ttl_s: int) -> None:
        self._redis = store.redis
        self._ttl_s = ttl_s

    async def PutResponse(self, request: cache_pb2.PutResponseRequest, context: grpc.aio.ServicerContext):
        key = _key(request.tenant, request.response.id)
        await self._redis.set(key, request.response.SerializeToString(), ex=self._ttl_s)
        return cache_pb2.PutResponseReply()

    async def GetResponse(self, request: cache_pb2.GetResponseRequest, context: grpc.aio.ServicerContext):
        raw = await self._redis.get(_key(request.tenant, request.id))
        if raw is None:
            return cache_pb2.GetResponseReply(found=False)
        return cache_pb2.GetResponseReply(found=True, response=cache_pb2.StoredResponse.FromString(raw))

    async def DeleteResponse(self, request: cache_pb2.DeleteResponseRequest, context: grpc.aio.ServicerContext):
        return cache_pb2.DeleteResponseReply(deleted=bool(await self._redis.delete(_key(request.tenant, request.id))))

"""KServe v2 GRPCInferenceService on the gateway: stock Triton clients, same API keys, via the router."""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.deadlines import downstream_timeout
from services.common.wire import TENANT_HEADER
from services.gateway.auth import Authenticator


class KServeProxyService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, auth: Authenticator, router: service_pb2_grpc.GRPCInferenceServiceStub,
                 infer_timeout_s: float, metadata_timeout_s: float, is_ready) -> None:
        self._auth = auth
        self._router = router
        self._infer_timeout_s = infer_timeout_s
        self._metadata_timeout_s = metadata_timeout_s
        self._is_ready = is_ready

    async def _forward_headers(self, context) -> tuple[tuple[str, str], ...]:
        caller = await self._auth.require(context)
        return ((TENANT_HEADER, caller.tenant),)

    async def _unary(self, method, request, context, timeout_s: float):
        headers = await self._forward_headers(context)
        try:
            return await method(request, timeout=downstream_timeout(context, timeout_s), metadata=headers)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"router: {exc.details()}")

    async def ServerLive(self, request, context):
        await self._auth.require(context)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        await self._auth.require(context)
        return service_pb2.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):
        return await self._unary(self._router.ModelReady, request, context, self._metadata_timeout_s)

    async def ModelMetadata(self, request, context):
        return await self._unary(self._router.ModelMetadata, request, context, self._metadata_timeout_s)

    async def ModelInfer(self, request, context):
        return await self._unary(self._router.ModelInfer, request, context, self._infer_timeout_s)

    async def ModelStreamInfer(self, request_iterator, context):
        headers = await self._forward_headers(context)
        call = None
        try:
            # Inside the try: an open breaker refuses the call right here, with UNAVAILABLE.
            call = self._router.ModelStreamInfer(request_iterator, metadata=headers,
                                                 timeout=downstream_timeout(context, self._infer_timeout_s))
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"router: {exc.details()}")
        finally:
            if call is not None:
                call.cancel()

"""KServe v2 GRPCInferenceService on the gateway: stock Triton clients, same API keys, via the router.

Governed like the mesh API: inputs checked and one stream's outstanding work bounded
(services/gateway/kserve_governance.py); each request's worst case reserved before it runs and settled with the
usage the model reports, asked for whatever the caller asked (services/gateway/kserve_metering.py).
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.deadlines import downstream_timeout
from services.common.errors import unimplemented
from services.gateway.auth import current_caller
from services.gateway.errors import from_rpc_error
from services.gateway.kserve_governance import StreamWindow, check_infer_request
from services.gateway.kserve_metering import KServeMeter, MeteredCall, caller_headers
from services.gateway.settings import KServeLimits
from services.gateway.version import MESH_NAME, MESH_VERSION

# What the mesh answers of Triton's extensions: configuration and statistics per public model, a read-only index.
EXTENSIONS = ["model_configuration", "statistics", "model_repository(read-only)"]
_READ_ONLY = ("the mesh's model repository is read-only: which models run where is the router's registry "
              "(config/registry.yaml, reloaded with RouterAdmin/ReloadRegistry), not a load or unload call")


class KServeProxyService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, router: service_pb2_grpc.GRPCInferenceServiceStub,
                 infer_timeout_s: float, metadata_timeout_s: float, is_ready, meter: KServeMeter,
                 limits: KServeLimits | None = None) -> None:
        self._router = router
        self._infer_timeout_s = infer_timeout_s
        self._metadata_timeout_s = metadata_timeout_s
        self._is_ready = is_ready
        self._meter = meter
        self._limits = limits or KServeLimits()

    async def _unary(self, method, request, context, timeout_s: float):
        caller = current_caller()
        try:
            return await method(request, timeout=downstream_timeout(context, timeout_s),
                                metadata=caller_headers(caller))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "router") from exc

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):
        return await self._unary(self._router.ModelReady, request, context, self._metadata_timeout_s)

    async def ModelMetadata(self, request, context):
        return await self._unary(self._router.ModelMetadata, request, context, self._metadata_timeout_s)

    async def ModelConfig(self, request, context):
        return await self._unary(self._router.ModelConfig, request, context, self._metadata_timeout_s)

    async def ModelStatistics(self, request, context):
        return await self._unary(self._router.ModelStatistics, request, context, self._metadata_timeout_s)

    async def RepositoryIndex(self, request, context):
        return await self._unary(self._router.RepositoryIndex, request, context, self._metadata_timeout_s)

    async def ServerMetadata(self, request, context):
        """The mesh, not one Triton: which replica would answer is the router's choice per request."""
        return service_pb2.ServerMetadataResponse(name=MESH_NAME, version=MESH_VERSION, extensions=EXTENSIONS)

    async def RepositoryModelLoad(self, request, context):
        raise unimplemented(_READ_ONLY)

    async def RepositoryModelUnload(self, request, context):
        raise unimplemented(_READ_ONLY)

    async def ModelInfer(self, request, context):
        caller = current_caller()
        check_infer_request(request, self._limits)
        call = await self._meter.open(caller, request)
        try:
            response = await self._router.ModelInfer(
                request, timeout=downstream_timeout(context, self._infer_timeout_s), metadata=call.headers)
            call.answered(response)
            return response
        except grpc.aio.AioRpcError as exc:
            call.failed(exc.code().name)
            raise from_rpc_error(exc, "router") from exc
        except BaseException:
            call.failed("CANCELLED")
            raise
        finally:
            self._meter.settle(call)

    async def ModelStreamInfer(self, request_iterator, context):
        caller = current_caller()
        # Each request's account by its id, oldest first (ids may repeat: a caller's responses carry only the id).
        open_calls: dict[str, list[MeteredCall]] = {}

        async def metered(request) -> None:
            open_calls.setdefault(request.id, []).append(await self._meter.open(caller, request))

        window = StreamWindow(self._limits.max_outstanding_per_stream, self._limits, metered)
        call = None
        try:
            # Inside the try: an open breaker refuses the call right here, with UNAVAILABLE.
            call = self._router.ModelStreamInfer(window.requests(request_iterator), metadata=caller_headers(caller),
                                                 timeout=downstream_timeout(context, self._infer_timeout_s))
            async for response in call:
                final = window.answered(response)
                pending = open_calls.get(response.infer_response.id)
                if pending:
                    pending[0].answered(response.infer_response)
                    if final:
                        if response.error_message:
                            pending[0].failed()
                        self._meter.settle(pending.pop(0))
                yield response
            if window.refused is not None:
                raise window.refused
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "router") from exc
        finally:
            if call is not None:
                call.cancel()
            # Cancelled or failed midway: each is charged what its model had reported (prompt and tokens).
            for pending in open_calls.values():
                for metered_call in pending:
                    metered_call.failed("CANCELLED")
                    self._meter.settle(metered_call)

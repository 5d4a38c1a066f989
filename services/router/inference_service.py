"""The router's KServe v2 GRPCInferenceService: public model names in, placement out in parameters."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.deadlines import downstream_timeout
from services.common.kserve import is_final_response
from services.router.balancer import LeastOutstandingBalancer, NoReplicaError
from services.router.registry import ModelSpec, Registry
from services.router.replicas import Replica

log = logging.getLogger(__name__)

# A call that fails with these before any response reached the caller is tried once more elsewhere.
_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE,)


def _stamp(response: service_pb2.ModelInferResponse, model_name: str, spec: ModelSpec, replica: Replica) -> None:
    response.model_name = model_name
    response.parameters["mesh_pool"].string_param = replica.pool
    response.parameters["mesh_replica"].string_param = replica.name
    response.parameters["mesh_model_version"].string_param = response.model_version or spec.version


class RoutingInferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: Registry, balancer: LeastOutstandingBalancer, default_timeout_s: float) -> None:
        self._registry = registry
        self._balancer = balancer
        self._default_timeout_s = default_timeout_s

    def any_model_ready(self) -> bool:
        return any(self._balancer.can_serve(spec) for spec in self._registry.models.values())

    async def _resolve(self, name: str, context: grpc.aio.ServicerContext) -> ModelSpec:
        spec = self._registry.models.get(name)
        if spec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown model {name!r}; known models: {sorted(self._registry.models)}")
        return spec

    async def _choose(self, spec: ModelSpec, context: grpc.aio.ServicerContext,
                      exclude: frozenset[str] = frozenset()) -> Replica:
        try:
            return self._balancer.choose(spec, exclude)
        except NoReplicaError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.any_model_ready())

    async def ModelReady(self, request, context):
        spec = self._registry.models.get(request.name)
        return service_pb2.ModelReadyResponse(ready=spec is not None and self._balancer.can_serve(spec))

    async def ModelMetadata(self, request, context):
        spec = await self._resolve(request.name, context)
        replica = await self._choose(spec, context)
        try:
            answer = await replica.stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=spec.triton_model, version=spec.version),
                timeout=downstream_timeout(context, 10.0),
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        answer.name = request.name
        return answer

    async def ModelInfer(self, request, context):
        spec = await self._resolve(request.model_name, context)
        public_name = request.model_name
        request.model_name = spec.triton_model
        request.model_version = request.model_version or spec.version
        tried: frozenset[str] = frozenset()
        while True:
            replica = await self._choose(spec, context, tried)
            try:
                with replica.track():
                    response = await replica.stub.ModelInfer(
                        request, timeout=downstream_timeout(context, self._default_timeout_s))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES:
                    replica.mark_failed(f"{exc.code().name}: {exc.details()}")
                    if not tried:
                        tried = frozenset({replica.name})
                        continue
                await context.abort(exc.code(), exc.details() or "")
            _stamp(response, public_name, spec, replica)
            return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request on the stream is routed on its own and relayed concurrently, as Triton does."""
        responses: asyncio.Queue[service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
        relays: set[asyncio.Task[None]] = set()

        async def read_requests() -> None:
            async for request in request_iterator:
                relay = asyncio.create_task(self._relay_stream(request, context, responses))
                relays.add(relay)
                relay.add_done_callback(relays.discard)
            while relays:
                await asyncio.gather(*list(relays), return_exceptions=True)
            await responses.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await responses.get()) is not None:
                yield item
            await reader
        finally:
            for task in [reader, *relays]:
                task.cancel()
            await asyncio.gather(reader, *relays, return_exceptions=True)

    async def _relay_stream(self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext,
                            out: asyncio.Queue[service_pb2.ModelStreamInferResponse | None]) -> None:
        public_name = request.model_name
        spec = self._registry.models.get(public_name)
        if spec is None:
            await out.put(service_pb2.ModelStreamInferResponse(
                error_message=f"unknown model {public_name!r}; known models: {sorted(self._registry.models)}"))
            return
        request.model_name = spec.triton_model
        request.model_version = request.model_version or spec.version
        tried: frozenset[str] = frozenset()
        while True:
            try:
                replica = self._balancer.choose(spec, tried)
            except NoReplicaError as exc:
                await out.put(service_pb2.ModelStreamInferResponse(error_message=f"UNAVAILABLE: {exc}"))
                return
            sent_any = False
            call = replica.stub.ModelStreamInfer(iter([request]),
                                                 timeout=downstream_timeout(context, self._default_timeout_s))
            try:
                with replica.track():
                    async for response in call:
                        # Placement is read from the last response; stamping every token would cost for nothing.
                        if not response.error_message and is_final_response(response.infer_response):
                            _stamp(response.infer_response, public_name, spec, replica)
                        sent_any = True
                        await out.put(response)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES:
                    replica.mark_failed(f"{exc.code().name}: {exc.details()}")
                    if not sent_any and not tried:
                        tried = frozenset({replica.name})
                        continue
                await out.put(service_pb2.ModelStreamInferResponse(
                    error_message=f"{exc.code().name}: {exc.details()}"))
                return
            finally:
                with contextlib.suppress(Exception):
                    call.cancel()


"""The router's KServe v2 GRPCInferenceService: public model names in, placement out in parameters."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from prometheus_client import Counter
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.canary import choose_version
from services.common.deadlines import downstream_timeout
from services.common.kserve import is_final_response
from services.common.wire import AFFINITY_PARAMETER, SESSION_PARAMETER, SPILL_PARAMETER, TENANT_HEADER
from services.router.balancer import AtCapacityError, Balancer, NoReplicaError, Route
from services.router.registry import ModelSpec
from services.router.replicas import Replica
from services.router.state import RouterState

log = logging.getLogger(__name__)

# A call that fails with these before any response reached the caller is tried once more elsewhere.
_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE,)

ROUTED = Counter("mesh_router_requests_total", "Requests routed, by public model, version, pool and replica",
                 ["model", "version", "pool", "replica"])


def _stamp(response: service_pb2.ModelInferResponse, model_name: str, spec: ModelSpec, replica: Replica) -> None:
    response.model_name = model_name
    response.parameters["mesh_pool"].string_param = replica.pool
    response.parameters["mesh_replica"].string_param = replica.name
    response.parameters["mesh_model_version"].string_param = response.model_version or spec.version


def _parameter(request: service_pb2.ModelInferRequest, name: str) -> str:
    return request.parameters[name].string_param if name in request.parameters else ""


def _tenant(context: grpc.aio.ServicerContext) -> str:
    return next((v for k, v in context.invocation_metadata() or () if k == TENANT_HEADER), "")


def prepare(request: service_pb2.ModelInferRequest, spec: ModelSpec, tenant: str) -> Route:
    """Public name → Triton name and version (canary weights, sticky by session, else tenant); the route key."""
    public_name = request.model_name
    session = _parameter(request, SESSION_PARAMETER)
    request.model_name = spec.triton_model
    if not request.model_version:
        request.model_version = choose_version(public_name, spec.versions, session or tenant, spec.version)
    return Route(affinity_key=_parameter(request, AFFINITY_PARAMETER) or session)


class RoutingInferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: RouterState, balancer: Balancer, default_timeout_s: float) -> None:
        self._state = state
        self._balancer = balancer
        self._default_timeout_s = default_timeout_s

    def any_model_ready(self) -> bool:
        return any(self._balancer.can_serve(spec) for spec in self._state.registry.models.values())

    def _unknown(self, name: str) -> str:
        return f"unknown model {name!r}; known models: {sorted(self._state.registry.models)}"

    async def _resolve(self, name: str, context: grpc.aio.ServicerContext) -> ModelSpec:
        spec = self._state.registry.models.get(name)
        if spec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(name))
        return spec

    async def _choose(self, spec: ModelSpec, context: grpc.aio.ServicerContext, route: Route | None = None) -> Replica:
        try:
            return self._balancer.choose(spec, route or Route())
        except AtCapacityError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            raise
        except NoReplicaError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.any_model_ready())

    async def ModelReady(self, request, context):
        spec = self._state.registry.models.get(request.name)
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
        route = prepare(request, spec, _tenant(context))
        while True:
            replica = await self._choose(spec, context, route)
            try:
                with replica.track():
                    response = await replica.stub.ModelInfer(
                        request, timeout=downstream_timeout(context, self._default_timeout_s))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES:
                    replica.mark_failed(f"{exc.code().name}: {exc.details()}")
                    if not route.exclude:
                        route = Route(route.affinity_key, frozenset({replica.name}))
                        continue
                await context.abort(exc.code(), exc.details() or "")
            _stamp(response, public_name, spec, replica)
            ROUTED.labels(public_name, response.model_version, replica.pool, replica.name).inc()
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
        spec = self._state.registry.models.get(public_name)
        if spec is None:
            await out.put(service_pb2.ModelStreamInferResponse(error_message=self._unknown(public_name)))
            return
        route = prepare(request, spec, _tenant(context))
        while True:
            try:
                choice = self._balancer.place(spec, route)
            except NoReplicaError as exc:
                code = "RESOURCE_EXHAUSTED" if isinstance(exc, AtCapacityError) else "UNAVAILABLE"
                await out.put(service_pb2.ModelStreamInferResponse(error_message=f"{code}: {exc}"))
                return
            replica = choice.replica
            if choice.spilled:
                request.parameters[SPILL_PARAMETER].bool_param = True
            elif SPILL_PARAMETER in request.parameters:
                del request.parameters[SPILL_PARAMETER]
            sent_any = False
            call = replica.stub.ModelStreamInfer(iter([request]),
                                                 timeout=downstream_timeout(context, self._default_timeout_s))
            try:
                with replica.track():
                    async for response in call:
                        # Placement is read from the last response; stamping every token would cost for nothing.
                        if not response.error_message and is_final_response(response.infer_response):
                            _stamp(response.infer_response, public_name, spec, replica)
                            ROUTED.labels(public_name, response.infer_response.model_version, replica.pool,
                                          replica.name).inc()
                        sent_any = True
                        await out.put(response)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES:
                    replica.mark_failed(f"{exc.code().name}: {exc.details()}")
                    if not sent_any and not route.exclude:
                        route = Route(route.affinity_key, frozenset({replica.name}))
                        continue
                await out.put(service_pb2.ModelStreamInferResponse(
                    error_message=f"{exc.code().name}: {exc.details()}"))
                return
            finally:
                with contextlib.suppress(Exception):
                    call.cancel()


"""The KServe relay (services/gateway/kserve_proxy.py) against a scripted router: the caller's identity comes
from the authenticating interceptor, the request goes on with the plan's headers, and the router's failures
reach the caller as the mesh's statuses."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import models_pb2
from services.common.errors import MeshError
from services.common.kserve import InferRequestBuilder
from services.common.wire import TENANT_HEADER
from services.gateway import auth
from services.gateway.auth import Caller
from services.gateway.kserve_metering import KServeMeter
from services.gateway.kserve_proxy import KServeProxyService
from tests.unit.fakes import FakeContext, rpc_error


class Catalog:
    async def get(self, name):
        return models_pb2.ModelInfo(name=name, kind=models_pb2.MODEL_KIND_EMBED, dimension=4)


class ScriptedRouter:
    def __init__(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.error, self.sent = error, []

    async def ModelInfer(self, request, timeout=None, metadata=None):  # noqa: ASYNC109 - the stub's signature
        self.sent.append((request, dict(metadata or ())))
        if self.error is not None:
            raise self.error
        return service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)


def _proxy(router: ScriptedRouter) -> KServeProxyService:
    return KServeProxyService(router, 30.0, 5.0, is_ready=lambda: True, meter=KServeMeter(None, Catalog(), 60.0))


def _embed_request() -> service_pb2.ModelInferRequest:
    request = InferRequestBuilder("embedder").add_bytes("text", [b"hello"]).build()
    request.id = "req-9"
    return request


async def test_a_call_goes_on_as_the_authenticated_caller_with_the_plans_headers():
    auth._CALLER.set(Caller("tenant-a", "standard"))
    router = ScriptedRouter()
    response = await _proxy(router).ModelInfer(_embed_request(), FakeContext("someone-else"))
    (_, headers), = router.sent
    assert headers[TENANT_HEADER] == "tenant-a", "the tenant is the credential's, not a header the caller sent"
    assert headers["x-request-id"] == "req-9" and response.id == "req-9"


async def test_the_routers_failures_are_the_mesh_statuses_and_hide_internals():
    auth._CALLER.set(Caller("tenant-a", "standard"))
    with pytest.raises(MeshError) as gone:
        await _proxy(ScriptedRouter(rpc_error(grpc.StatusCode.CANCELLED, "router restarting"))).ModelInfer(
            _embed_request(), FakeContext())
    assert gone.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(MeshError) as broken:
        await _proxy(ScriptedRouter(rpc_error(grpc.StatusCode.INTERNAL, "Traceback at /opt/triton"))).ModelInfer(
            _embed_request(), FakeContext())
    assert broken.value.code == grpc.StatusCode.INTERNAL and "/opt/triton" not in broken.value.message


async def test_the_repository_is_read_only_and_a_handler_needs_the_interceptor():
    auth._CALLER.set(Caller("tenant-a", "standard"))
    with pytest.raises(MeshError) as load:
        await _proxy(ScriptedRouter()).RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(), FakeContext())
    assert load.value.code == grpc.StatusCode.UNIMPLEMENTED
    auth._CALLER.set(None)
    with pytest.raises(MeshError) as unguarded:
        await _proxy(ScriptedRouter()).ModelInfer(_embed_request(), FakeContext())
    assert unguarded.value.code == grpc.StatusCode.INTERNAL, "no silent anonymous caller"

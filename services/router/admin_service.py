"""RouterAdmin: the registry and the replicas' state, for the gateway and for operators."""

from __future__ import annotations

from inference_mesh.v1 import router_pb2, router_pb2_grpc
from services.router.balancer import LeastOutstandingBalancer
from services.router.registry import Registry
from services.router.replicas import ReplicaSet


class RouterAdminService(router_pb2_grpc.RouterAdminServicer):
    def __init__(self, registry: Registry, replicas: ReplicaSet, balancer: LeastOutstandingBalancer) -> None:
        self._registry = registry
        self._replicas = replicas
        self._balancer = balancer

    async def ListModels(self, request, context):
        return router_pb2.RouterListModelsResponse(
            models=[self._registry.model_info(name, self._balancer.can_serve(spec))
                    for name, spec in sorted(self._registry.models.items())])

    async def ListReplicas(self, request, context):
        return router_pb2.ListReplicasResponse(replicas=[
            router_pb2.ReplicaInfo(name=r.name, pool=r.pool, endpoint=r.endpoint, ready=r.ready,
                                   in_flight=r.in_flight, ready_models=sorted(r.ready_models),
                                   last_error=r.last_error)
            for r in self._replicas.replicas
        ])

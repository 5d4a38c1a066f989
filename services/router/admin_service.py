"""RouterAdmin: the registry, pools and replicas with their state and load; drain, undrain, reload."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from inference_mesh.v1 import router_pb2, router_pb2_grpc
from services.common.errors import not_found
from services.router.admission import FairAdmission
from services.router.balancer import Balancer
from services.router.replicas import Replica
from services.router.state import RouterState


class RouterAdminService(router_pb2_grpc.RouterAdminServicer):
    def __init__(self, state: RouterState, balancer: Balancer, queue_ms_per_slot: float,
                 admissions: Callable[[], dict[str, FairAdmission]] = dict) -> None:
        self._state = state
        self._balancer = balancer
        self._queue_ms_per_slot = queue_ms_per_slot
        self._admissions = admissions

    def _info(self, replica: Replica) -> router_pb2.ReplicaInfo:
        load = max((replica.load(m, self._queue_ms_per_slot) for m in replica.models), default=replica.in_flight)
        return router_pb2.ReplicaInfo(
            name=replica.name, pool=replica.pool, endpoint=replica.endpoint, ready=replica.ready,
            in_flight=replica.in_flight, ready_models=sorted(replica.ready_models), last_error=replica.last_error,
            draining=replica.draining, triton_pending=replica.total_pending(), queue_ms=replica.mean_queue_ms(),
            load=load, gpu_class=replica.gpu_class)

    async def ListModels(self, request, context):
        registry = self._state.registry
        return router_pb2.RouterListModelsResponse(
            models=[registry.model_info(name, self._balancer.can_serve_any(spec, registry.fallback_of(spec)))
                    for name, spec in sorted(registry.models.items())],
            groups=[registry.group_info(name) for name in sorted(registry.groups)])

    async def ListReplicas(self, request, context):
        queues = [router_pb2.AdmissionQueue(triton_model=model, tenant=tenant,
                                            interactive=waiting.get("interactive", 0), batch=waiting.get("batch", 0))
                  for model, admission in sorted(self._admissions().items())
                  for tenant, waiting in sorted(admission.queues().items())]
        return router_pb2.ListReplicasResponse(replicas=[self._info(r) for r in self._state.replicas.replicas],
                                               queues=queues)

    async def ListPools(self, request, context):
        pools = []
        for name, spec in self._state.registry.pools.items():
            members = [self._info(r) for r in self._state.replicas.in_pool(name)]
            pools.append(router_pb2.PoolInfo(
                name=name, gpu_class=spec.gpu_class, replicas=members,
                ready_replicas=sum(1 for r in members if r.ready and not r.draining),
                load=sum(r.load for r in members)))
        return router_pb2.ListPoolsResponse(pools=pools)

    async def _replica(self, name: str, context: grpc.aio.ServicerContext) -> Replica:
        replica = self._state.replicas.get(name)
        if replica is None:
            known = [r.name for r in self._state.replicas.replicas]
            raise not_found(f"unknown replica {name!r}; known replicas: {known}")
        return replica

    async def DrainReplica(self, request, context):
        replica = await self._replica(request.replica, context)
        replica.draining = True
        return self._info(replica)

    async def UndrainReplica(self, request, context):
        replica = await self._replica(request.replica, context)
        replica.draining = False
        return self._info(replica)

    async def ReloadRegistry(self, request, context):
        result = self._state.reload()
        registry = self._state.registry
        return router_pb2.ReloadReply(changed=result.changed, error=result.error, models=sorted(registry.models),
                                      replicas=[r.name for r in self._state.replicas.replicas])

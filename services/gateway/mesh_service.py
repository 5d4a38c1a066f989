"""The public InferenceMesh service over gRPC: the caller (authenticated by the interceptor), bound by the
caller's deadline, then the core."""

from __future__ import annotations

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.common.deadlines import downstream_timeout
from services.gateway.auth import current_caller
from services.gateway.core import MeshCore


class InferenceMeshService(mesh_pb2_grpc.InferenceMeshServicer):
    def __init__(self, core: MeshCore) -> None:
        self._core = core
        self._settings = core.settings

    async def Generate(self, request, context):
        caller = current_caller()
        generation = await self._core.generate(caller, request, context.time_remaining())
        async for chunk in generation.chunks:
            yield chunk

    async def Embed(self, request, context):
        caller = current_caller()
        return await self._core.embed(caller, request, context.time_remaining())

    async def Ask(self, request, context):
        caller = current_caller()
        generation = await self._core.ask(caller, request, context.time_remaining())
        async for chunk in generation.chunks:
            yield chunk

    async def UpsertDocuments(self, request_iterator, context):
        caller = current_caller()
        return await self._core.upsert(caller, request_iterator,
                                       downstream_timeout(context, self._settings.ingest_timeout_s))

    async def DeleteDocuments(self, request, context):
        caller = current_caller()
        return await self._core.documents.delete(caller, request,
                                                 downstream_timeout(context, self._settings.delete_timeout_s))

    async def Search(self, request, context):
        caller = current_caller()
        return await self._core.documents.search(caller, request,
                                                 downstream_timeout(context, self._settings.search_timeout_s))

    async def CollectionStats(self, request, context):
        caller = current_caller()
        return await self._core.documents.stats(caller, downstream_timeout(context, self._settings.search_timeout_s))

    async def ReportWrongCacheHit(self, request, context):
        caller = current_caller()
        return await self._core.report_wrong_cache_hit(caller, request, context.time_remaining())

    async def ListModels(self, request, context):
        return mesh_pb2.ListModelsResponse(models=await self._core.models())

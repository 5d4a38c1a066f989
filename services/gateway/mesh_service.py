"""The public InferenceMesh service over gRPC: the caller (authenticated by the interceptor), bound by the
caller's deadline, then the core."""

from __future__ import annotations

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.gateway.auth import current_caller
from services.gateway.core import MeshCore


class InferenceMeshService(mesh_pb2_grpc.InferenceMeshServicer):
    def __init__(self, core: MeshCore) -> None:
        self._core = core

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
        return await self._core.upsert(current_caller(), request_iterator, context.time_remaining())

    async def DeleteDocuments(self, request, context):
        return await self._core.delete_documents(current_caller(), request, context.time_remaining())

    async def Search(self, request, context):
        return await self._core.search(current_caller(), request, context.time_remaining())

    async def CollectionStats(self, request, context):
        return await self._core.collection_stats(current_caller(), context.time_remaining())

    async def ReportWrongCacheHit(self, request, context):
        caller = current_caller()
        return await self._core.report_wrong_cache_hit(caller, request, context.time_remaining())

    async def ListModels(self, request, context):
        return mesh_pb2.ListModelsResponse(models=await self._core.models())

"""A process's view of the model registry, fetched from the router (the registry's one owner): the gateway's
models and groups, the cache's and retrieval's embedder dimension."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from inference_mesh.v1 import models_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class ModelCatalog:
    def __init__(self, admin: router_pb2_grpc.RouterAdminStub, refresh_s: float, timeout_s: float) -> None:
        self._admin = admin
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._models: dict[str, models_pb2.ModelInfo] = {}
        self._groups: dict[str, models_pb2.ModelGroup] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return bool(self._models)

    def all(self) -> list[models_pb2.ModelInfo]:
        return list(self._models.values())

    async def refresh(self) -> bool:
        async with self._lock:
            try:
                answer = await self._admin.ListModels(router_pb2.RouterListModelsRequest(), timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.warning("model list unavailable", extra={"error": exc.details()})
                return False
            self._models = {m.name: m for m in answer.models}
            self._groups = {g.name: g for g in answer.groups}
            self._fetched_at = time.monotonic()
            return True

    async def get(self, name: str) -> models_pb2.ModelInfo | None:
        """A known model; an unknown name triggers one refresh, at most once per refresh period."""
        if name not in self._models and name not in self._groups and \
                time.monotonic() - self._fetched_at > self._refresh_s:
            await self.refresh()
        return self._models.get(name)

    def group(self, name: str) -> models_pb2.ModelGroup | None:
        return self._groups.get(name)

    def groups(self) -> list[models_pb2.ModelGroup]:
        return list(self._groups.values())

    async def refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)

    async def embed_dimension(self, name: str) -> int:
        """The vector size of an embed model as the registry declares it; 0 while the router cannot say."""
        model = await self.get(name)
        if model is None or model.kind != models_pb2.MODEL_KIND_EMBED:
            if self.loaded:
                log.error("the embedder is not an embed model of the registry", extra={"model": name})
            return 0
        return model.dimension

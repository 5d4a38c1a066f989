"""The model registry (YAML): models → Triton model, version, pools; pools → replica endpoints."""

from __future__ import annotations

import pathlib
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from inference_mesh.v1 import models_pb2


class ReplicaSpec(BaseModel, extra="forbid"):
    name: str
    grpc: str = Field(description="host:port of the replica's KServe gRPC endpoint")
    metrics: str = ""


class PoolSpec(BaseModel, extra="forbid"):
    # a100: throughput, t4: cost, cpu: local development.
    gpu_class: Literal["a100", "t4", "cpu", "gpu"] = "cpu"
    replicas: list[ReplicaSpec]


class ModelSpec(BaseModel, extra="forbid"):
    kind: Literal["generate", "embed"]
    triton_model: str
    version: str = ""
    pools: list[str] = Field(min_length=1)
    max_output_tokens: int = 0
    context_tokens: int = 0
    max_batch_size: int = 0
    dimension: int = 0
    # Seed guide: a semantic cache hit needs cosine similarity >= 0.92.
    semantic_threshold: float = 0.92


class Registry(BaseModel, extra="forbid"):
    pools: dict[str, PoolSpec]
    models: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _pools_exist(self) -> Registry:
        names = [r.name for pool in self.pools.values() for r in pool.replicas]
        if len(names) != len(set(names)):
            raise ValueError("replica names must be unique across pools")
        for name, model in self.models.items():
            unknown = [p for p in model.pools if p not in self.pools]
            if unknown:
                raise ValueError(f"model {name!r} names unknown pools {unknown}")
        return self

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Registry:
        return cls.model_validate(yaml.safe_load(pathlib.Path(path).read_text()))

    def model_info(self, name: str, ready: bool) -> models_pb2.ModelInfo:
        spec = self.models[name]
        kind = models_pb2.MODEL_KIND_GENERATE if spec.kind == "generate" else models_pb2.MODEL_KIND_EMBED
        return models_pb2.ModelInfo(
            name=name, kind=kind, version=spec.version, pools=spec.pools, ready=ready,
            max_output_tokens=spec.max_output_tokens, context_tokens=spec.context_tokens,
            max_batch_size=spec.max_batch_size, dimension=spec.dimension,
            semantic_threshold=spec.semantic_threshold,
        )

"""The model registry (YAML): pools with GPU classes and replicas; models with their placements, versions and
canary weights, routing policy; model groups (cascades). The router owns it and reloads it without a restart."""

from __future__ import annotations

import pathlib
from typing import Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from inference_mesh.v1 import models_pb2
from services.cache.calibration import SemanticCalibration, UncalibratedBudget

RoutingPolicy = Literal["least_outstanding", "queue_aware", "prefix_affinity"]


class ReplicaSpec(BaseModel, extra="forbid"):
    name: str
    grpc: str = Field(description="host:port of the replica's KServe gRPC endpoint")
    # host:port of its Prometheus endpoint: the queue-aware choice reads pending requests and queue time there.
    metrics: str = ""
    # The name its TLS certificate carries when `grpc` is an address (replicas found in DNS: the SRV target).
    authority: str = ""


class DnsDiscovery(BaseModel, extra="forbid"):
    """A pool's replicas from DNS SRV records instead of a list: a Kubernetes headless Service publishes one per
    ready pod (`_<port name>._tcp.<service>.<namespace>.svc.cluster.local` -> `<pod>.<service>...:<port>`), so
    replicas that start, stop or fail readiness are picked up, and removed ones drained
    (services/router/discovery.py)."""

    srv: str = Field(min_length=1, description="the SRV name of the replicas' KServe gRPC port")
    # Their Prometheus port on the same hosts (Triton's 8002); 0: not read (no queue-aware signal).
    metrics_port: int = Field(default=8002, ge=0, le=65535)


class PoolSpec(BaseModel, extra="forbid"):
    # a100: throughput, t4: cost, cpu: local development.
    gpu_class: Literal["a100", "t4", "cpu", "gpu"] = "cpu"
    replicas: list[ReplicaSpec] = Field(default_factory=list)
    discover: DnsDiscovery | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PoolSpec:
        if self.discover is not None and self.replicas:
            raise ValueError("a pool lists its replicas or discovers them (discover.srv), not both")
        return self


# What a placement's engine can do beyond free text, named in the registry (`supports`) and asked for by requests:
# structured_output is decoding under a JSON schema (the `json_schema` input of the generation contract); tools is
# describing functions in the prompt and decoding calls to them (the `tools` input).
STRUCTURED_OUTPUT = "structured_output"
TOOLS = "tools"
Capability = Literal["structured_output", "tools"]


class Placement(BaseModel, extra="forbid"):
    pool: str
    cost_per_1k_tokens: float = 0.0
    latency_class: Literal["interactive", "standard", "batch"] = "standard"
    # Requests of this model one replica of this pool runs at once (what its engine batches: 1 for llama.cpp on
    # CPU, the engine's max batch for TensorRT-LLM); beyond, requests wait in the router's fair queues
    # (services/router/admission.py) instead of Triton's first-come queue. 0: only the router-wide bound.
    max_in_flight_per_replica: int = Field(default=0, ge=0)
    # Capabilities of this model's engine on this pool; a request that needs one runs only where it is declared.
    supports: list[Capability] = Field(default_factory=list)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(self.supports)


class ModelSpec(BaseModel, extra="forbid"):
    kind: Literal["generate", "embed"]
    triton_model: str
    # The default version; with `versions`, the weighted choice replaces it.
    version: str = ""
    # Canary / A-B: Triton version → weight (e.g. {"1": 95, "2": 5}).
    versions: dict[str, int] = Field(default_factory=dict)
    # Pools in order of preference: a name, or {pool, cost_per_1k_tokens, latency_class}.
    pools: list[Placement] = Field(min_length=1)
    routing: RoutingPolicy = "least_outstanding"
    max_output_tokens: int = 0
    context_tokens: int = 0
    max_batch_size: int = 0
    dimension: int = 0
    # The share of near-miss questions a semantic cache hit may answer wrongly on this model: a budget calibrated
    # for the cache's embedder (config/semantic-calibration.yaml); 0: the cache's
    # MESH_CACHE_SEMANTIC_MAX_FALSE_HIT_RATE.
    semantic_max_false_hit_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Semantic hits (a similar question answered with another's cached answer) are opt-in: on an independent set
    # of 150 near misses the content gate served 12% with another question's answer (issue 31; BENCHMARKS.md
    # "Semantic cache"). Exact hits need no opt-in.
    semantic_cache: bool = False
    # Another model of the same kind that serves this one's requests when none of its pools can (one hop).
    fallback: str = ""

    @field_validator("pools", mode="before")
    @classmethod
    def _names_are_placements(cls, value: list) -> list:
        return [{"pool": item} if isinstance(item, str) else item for item in value]

    @field_validator("versions")
    @classmethod
    def _weights(cls, value: dict[str, int]) -> dict[str, int]:
        if value and (any(w < 0 for w in value.values()) or sum(value.values()) <= 0):
            raise ValueError("version weights must be >= 0 with a positive sum")
        return value

    @property
    def pool_names(self) -> list[str]:
        return [p.pool for p in self.pools]

    def pools_supporting(self, needs: frozenset[str]) -> list[str]:
        return [p.pool for p in self.pools if needs <= p.capabilities]


class ModelGroup(BaseModel, extra="forbid"):
    """A cascade: the small model unless the prompt is long or the caller asks for high quality."""

    small: str
    large: str
    large_above_prompt_chars: int = 0
    large_for_high_quality: bool = True
    description: str = ""


class Registry(BaseModel, extra="forbid"):
    pools: dict[str, PoolSpec]
    models: dict[str, ModelSpec]
    groups: dict[str, ModelGroup] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Registry:
        names = [r.name for pool in self.pools.values() for r in pool.replicas]
        if len(names) != len(set(names)):
            raise ValueError("replica names must be unique across pools")
        for name, model in self.models.items():
            unknown = [p for p in model.pool_names if p not in self.pools]
            if unknown:
                raise ValueError(f"model {name!r} names unknown pools {unknown}")
            if model.fallback and (model.fallback == name or model.fallback not in self.models
                                   or self.models[model.fallback].kind != model.kind):
                raise ValueError(f"model {name!r}: fallback {model.fallback!r} must be another {model.kind} model "
                                 "of the registry")
            if model.semantic_max_false_hit_rate:
                try:
                    SemanticCalibration.load().threshold(model.semantic_max_false_hit_rate)
                except UncalibratedBudget as exc:
                    raise ValueError(f"model {name!r}: {exc}") from None
        for name, group in self.groups.items():
            if name in self.models:
                raise ValueError(f"group {name!r} has the name of a model")
            for member in (group.small, group.large):
                if member not in self.models or self.models[member].kind != "generate":
                    raise ValueError(f"group {name!r}: {member!r} is not a generate model of the registry")
        return self

    def fallback_of(self, spec: ModelSpec) -> ModelSpec | None:
        return self.models.get(spec.fallback) if spec.fallback else None

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Registry:
        return cls.model_validate(yaml.safe_load(pathlib.Path(path).read_text()))

    def model_info(self, name: str, ready: bool) -> models_pb2.ModelInfo:
        spec = self.models[name]
        kind = models_pb2.MODEL_KIND_GENERATE if spec.kind == "generate" else models_pb2.MODEL_KIND_EMBED
        return models_pb2.ModelInfo(
            name=name, kind=kind, version=spec.version, pools=spec.pool_names, ready=ready,
            max_output_tokens=spec.max_output_tokens, context_tokens=spec.context_tokens,
            max_batch_size=spec.max_batch_size, dimension=spec.dimension,
            semantic_max_false_hit_rate=spec.semantic_max_false_hit_rate, semantic_cache=spec.semantic_cache,
            placements=[models_pb2.Placement(pool=p.pool, gpu_class=self.pools[p.pool].gpu_class,
                                             cost_per_1k_tokens=p.cost_per_1k_tokens,
                                             latency_class=p.latency_class) for p in spec.pools],
            version_weights=spec.versions, routing=spec.routing, fallback=spec.fallback,
        )

    def group_info(self, name: str) -> models_pb2.ModelGroup:
        group = self.groups[name]
        return models_pb2.ModelGroup(name=name, small=group.small, large=group.large,
                                     large_above_prompt_chars=group.large_above_prompt_chars,
                                     large_for_high_quality=group.large_for_high_quality,
                                     description=group.description)

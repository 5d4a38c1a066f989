from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class CacheSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_CACHE_", extra="forbid")

    port: int = 50053
    metrics_port: int = 9103
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Empty: no semantic index (exact matches only).
    milvus_uri: str = ""
    milvus_collection: str = "mesh_semantic_cache"
    router_address: str = "127.0.0.1:50052"
    embedder_model: str = "all-minilm-l6-v2"
    embedder_dimension: int = 384
    # Seed guide: 1 h for responses, 5 min for embeddings.
    response_ttl_s: int = 3600
    embedding_ttl_s: int = 300
    # Seed guide: semantic hit at cosine >= 0.92 (a model in the registry may set its own).
    semantic_threshold: float = 0.92
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef: int = 64
    # A lease outlives the longest generation (60 s) so that a slow leader is not doubled.
    lease_s: float = 65.0
    # How long concurrent identical requests wait for the leader before generating on their own.
    stampede_wait_s: float = 20.0
    stampede_poll_s: float = 0.02
    # Cache calls must be cheap or skipped: tight timeouts, then the caller bypasses the cache.
    redis_timeout_s: float = 0.25
    milvus_timeout_s: float = 0.5
    embed_timeout_s: float = 2.0

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.deadlines import GENERATION_BUDGET_S
from services.common.milvus import HnswSettings, MilvusTimeouts
from services.common.settings import ServiceSettings


class CacheMilvusTimeouts(MilvusTimeouts):
    """Cache calls must be cheap or skipped: a search or write that cannot answer within these is a bypass. (A
    subclass rather than a default instance, so that setting one field from the environment keeps the others.)"""

    search_s: float = Field(default=0.5, gt=0)
    write_s: float = Field(default=0.5, gt=0)
    query_s: float = Field(default=2.0, gt=0)
    load_s: float = Field(default=2.5, gt=0)
    create_s: float = Field(default=10.0, gt=0)
    connect_s: float = Field(default=5.0, gt=0)


class CacheSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_CACHE_", extra="forbid")

    port: int = 50053
    metrics_port: int = 9103
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Empty: no semantic index (exact matches only).
    milvus_uri: str = ""
    milvus_collection: str = "mesh_semantic_cache"
    router_address: str = "127.0.0.1:50052"
    # Embeds prompts for the semantic index; its vector size is its registry entry's `dimension` (asked of the
    # router, which owns the registry).
    embedder_model: str = "all-minilm-l6-v2"
    model_refresh_s: float = 5.0
    # An hour keeps repeated questions cheap through a working day's peaks while answers from a replaced model or
    # prompt age out; embeddings are small but tied to a model version that a canary may change within minutes.
    response_ttl_s: int = 3600
    embedding_ttl_s: int = 300
    # Cosine similarity for a semantic hit, for models whose registry entry sets no `semantic_threshold`. Below
    # 0.92, MiniLM starts to pair questions that differ in a number or a negation.
    semantic_threshold: float = 0.92
    hnsw: HnswSettings = HnswSettings()
    milvus_timeouts: CacheMilvusTimeouts = CacheMilvusTimeouts()
    # A lease outlives the longest generation so that a slow leader is not doubled.
    lease_s: float = GENERATION_BUDGET_S + 5.0
    # How long concurrent identical requests wait for the leader before generating on their own.
    stampede_wait_s: float = 20.0
    stampede_poll_s: float = 0.02
    redis_timeout_s: float = 0.25
    embed_timeout_s: float = 2.0

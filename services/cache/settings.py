from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.cache.reads import STAMPEDE_WAIT_S
from services.cache.wordnet import DEFAULT_DIR
from services.common.deadlines import GENERATION_BUDGET_S
from services.common.milvus import HnswSettings, MilvusTimeouts
from services.common.settings import RouterClientSettings


class CacheMilvusTimeouts(MilvusTimeouts):
    """Cache calls must be cheap or skipped: a search or write that cannot answer within these is a bypass. (A
    subclass rather than a default instance, so that setting one field from the environment keeps the others.)"""

    search_s: float = Field(default=0.5, gt=0)
    write_s: float = Field(default=0.5, gt=0)
    query_s: float = Field(default=2.0, gt=0)
    load_s: float = Field(default=2.5, gt=0)
    create_s: float = Field(default=10.0, gt=0)
    connect_s: float = Field(default=5.0, gt=0)


class CacheSettings(RouterClientSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_CACHE_", extra="forbid")

    port: int = 50053
    metrics_port: int = 9103
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Empty: no semantic index (exact matches only).
    milvus_uri: str = ""
    # v2: rows keep their user text for the content gate (a v1 collection has no such field).
    milvus_collection: str = "mesh_semantic_cache_v2"
    # Embeds prompts for the semantic index; its vector size is its registry entry's `dimension` (asked of the
    # router, which owns the registry).
    embedder_model: str = "all-minilm-l6-v2"
    # An hour keeps repeated questions cheap through a working day's peaks while answers from a replaced model or
    # prompt age out; embeddings are small but tied to a model version that a canary may change within minutes.
    response_ttl_s: int = 3600
    embedding_ttl_s: int = 300
    # Responses API responses kept with store (OpenAI keeps them 30 days).
    stored_response_ttl_s: int = 30 * 24 * 3600
    # The share of near-miss questions a semantic hit may answer wrongly, for models whose registry entry sets
    # none: one of the budgets calibrated for the embedder (config/semantic-calibration.yaml), which
    # gives the cosine threshold. The gate (services/cache/gate.py) must explain every difference as well.
    semantic_max_false_hit_rate: float = 0.01
    # The nearest entries the gate may look through before the lookup is a miss.
    semantic_candidates: int = Field(default=4, ge=1, le=32)
    # Longer user texts get exact hits only: the embedder reads ~256 tokens, so two long texts that differ after
    # that would look identical to it.
    semantic_max_chars: int = 1000
    # The gate on every semantic candidate. Off only to measure what it costs (bench/cache_lookup.py).
    semantic_gate: bool = True
    # WordNet 3.0's database files (Debian's wordnet-base), which the gate reads lemmas and synonyms from.
    wordnet_dir: Path = DEFAULT_DIR
    # Reported wrong hits kept (newest first) as negative examples for the next calibration.
    negatives_kept: int = 10_000
    hnsw: HnswSettings = HnswSettings()
    milvus_timeouts: CacheMilvusTimeouts = CacheMilvusTimeouts()
    # A lease outlives the longest generation so that a slow leader is not doubled.
    lease_s: float = GENERATION_BUDGET_S + 5.0
    # How long concurrent identical requests wait for the leader before generating on their own.
    stampede_wait_s: float = STAMPEDE_WAIT_S
    stampede_poll_s: float = 0.02
    redis_timeout_s: float = 0.25
    embed_timeout_s: float = 2.0

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.admin.settings import AdminDatabase
from services.admin.usage import UsageSettings
from services.cache.reads import STAMPEDE_WAIT_S
from services.common.deadlines import GENERATION_BUDGET_S, INGEST_BUDGET_S, METADATA_BUDGET_S
from services.common.settings import RouterClientSettings
from services.gateway.batches.settings import BatchSettings


class RequestLimits(BaseModel, extra="forbid"):
    max_messages: int = 64
    max_prompt_chars: int = 32_768          # all message contents together
    max_stop_sequences: int = 4
    max_stop_chars: int = 64
    max_embed_batch: int = 256              # texts per Embed call
    max_embed_text_chars: int = 8_192
    max_request_id_chars: int = 128
    max_session_id_chars: int = 128
    max_question_chars: int = 4_096


class KServeLimits(BaseModel, extra="forbid"):
    """Bounds on the KServe endpoint, which takes tensors rather than the mesh API's typed fields."""

    max_name_chars: int = 256
    max_inputs: int = 16
    max_parameters: int = 16
    max_parameter_chars: int = 256
    # The largest public request: an Embed batch of 256 texts of 8,192 characters, UTF-8.
    max_request_bytes: int = 8 * 1024 * 1024
    max_elements: int = 1_000_000
    # Requests of one ModelStreamInfer stream outstanding at the router at once; the rest wait in the stream.
    max_outstanding_per_stream: int = 4


class GatewaySettings(RouterClientSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_GATEWAY_", env_nested_delimiter="__", extra="forbid")

    port: int = 50051
    # The OpenAI-compatible HTTP API (services/gateway/openai_http), reached through Envoy; 0: not served.
    http_port: int = 8080
    # The seed for an empty admin database (services/admin); afterwards tenants and keys live in the database.
    tenants_file: str = "config/tenants.yaml"
    admin: AdminDatabase = AdminDatabase()
    # Usage records into the admin database (services/admin/usage.py); off, or without a database, none.
    usage: UsageSettings = UsageSettings()
    # OpenAI's Files and Batches API (services/gateway/batches): kept in the admin database; none without one.
    batch: BatchSettings = BatchSettings()
    # A shorter caller deadline always wins.
    generate_timeout_s: float = GENERATION_BUDGET_S
    # How a generation's tokens reach this gateway. "direct": the router places the request on a lease and the
    # stream flows from the Triton replica here (one Python hop per token; gateways must reach the engines'
    # gRPC ports). "router": the router relays the stream (two hops), for networks where only routers may.
    token_path: Literal["direct", "router"] = "direct"
    embed_timeout_s: float = 30.0
    metadata_timeout_s: float = METADATA_BUDGET_S
    # Empty: no cache (responses say CACHE_STATUS_DISABLED).
    cache_address: str = ""
    # The cache's Redis, read-only: exact hits are read from it directly, saving the hop to the cache service
    # (misses, semantic lookups and writes still go there). Empty: every lookup through the cache service.
    cache_redis_url: str = ""
    # A lookup may wait for an identical in-flight generation (the cache's stampede wait), plus the lookup itself;
    # bounded by the caller's deadline.
    cache_lookup_timeout_s: float = STAMPEDE_WAIT_S + 5.0
    # Embedding lookups and lease releases are cheap or skipped; stores run after the reply and carry a whole
    # response (or a batch of vectors), so they get longer.
    cache_fast_timeout_s: float = 0.3
    cache_store_timeout_s: float = 3.0
    metrics_port: int = 9101
    # Empty: no retrieval (document RPCs say UNAVAILABLE; Ask answers without context, flagged degraded).
    retrieval_address: str = ""
    # Search and stats (and Ask's search, which then degrades) must not hang on retrieval: a short bound.
    search_timeout_s: float = 2.0
    # Deleting documents: a Strong-consistency query for their chunks, then a delete by key.
    delete_timeout_s: float = 10.0
    ingest_timeout_s: float = INGEST_BUDGET_S
    # More than 5 chunks rarely adds the answer but crowds a small model's context (and its attention).
    ask_default_top_k: int = 5
    ask_max_context_chars: int = 3_000    # ~750 tokens of SmolLM2's 2,048-token context
    ask_default_max_tokens: int = 256
    # Ask's relevance floor: below this cosine similarity between the question and every chunk found, the reply
    # says the documents do not answer (no generation). Measured on the retrieval evaluation set (BENCHMARKS.md).
    ask_min_similarity: float = 0.25
    # A system prompt at least this long is a prefix worth keeping on one replica (prefix affinity).
    affinity_min_prefix_chars: int = 200
    limits: RequestLimits = RequestLimits()
    kserve_limits: KServeLimits = KServeLimits()
    # The rate-limit service's TokenBudget. Empty: no token budgets.
    budget_address: str = ""
    budget_timeout_s: float = 0.25
    # Charges run after the reply: a slower answer costs nothing, a lost charge costs the budget's accuracy.
    budget_charge_timeout_s: float = 1.25
    # Budget service down: admit (open, the default, counted in mesh_gateway_budget_unavailable_total) or refuse.
    budget_fail_open: bool = True
    # Load shedding: RPCs worked on at once; beyond, RESOURCE_EXHAUSTED at once (0: no bound).
    max_in_flight: int = 512
    # The most of those one tenant may hold (its slow bodies or floods cannot take every place from the others).
    tenant_share_of_in_flight: float = Field(default=0.25, gt=0.0, le=1.0)
    # Shared with Envoy, which sends it with every request: only then is a JWT tenant header trusted.
    edge_secret: str = ""
    # Prompts and completions in the request log (redacted: emails, phone numbers, keys). Off: never logged.
    log_prompts: bool = False

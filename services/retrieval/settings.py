from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.milvus import HnswSettings, MilvusTimeouts
from services.common.settings import ServiceSettings


class RetrievalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_RETRIEVAL_", extra="forbid")

    port: int = 50054
    metrics_port: int = 9104
    milvus_uri: str = "http://127.0.0.1:19530"
    collection: str = "mesh_documents"
    router_address: str = "127.0.0.1:50052"
    # Embeds chunks and queries; its vector size is its registry entry's `dimension` (asked of the router).
    embedder_model: str = "all-minilm-l6-v2"
    model_refresh_s: float = 5.0
    embed_batch: int = 64
    # One ingest batch of up to `embed_batch` chunks per request to the embedder.
    embed_timeout_s: float = 60.0
    tokenizer_file: str = "triton_models/minilm/1/tokenizer.json"
    # MiniLM reads at most 256 tokens, so a longer chunk would be embedded by its first part only; a quarter of
    # overlap keeps a sentence cut at a boundary whole in one of the two chunks.
    chunk_tokens: int = 256
    chunk_overlap_tokens: int = 64
    hnsw: HnswSettings = HnswSettings()
    max_top_k: int = 100
    max_ef: int = 4096
    max_document_chars: int = 1_000_000
    max_documents_per_batch: int = 256
    max_filter_chars: int = 1024
    milvus_timeouts: MilvusTimeouts = MilvusTimeouts()
    # Session: a document is searchable through this process as soon as its upsert returns (read-your-writes),
    # without Strong's wait for the next time tick on every search (slow on a Milvus standalone). Other retrieval
    # replicas see it within Milvus' bounded staleness. "Strong" buys cross-replica freshness for that wait.
    consistency_level: str = "Session"

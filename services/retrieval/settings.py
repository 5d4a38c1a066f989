from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RetrievalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_RETRIEVAL_", extra="forbid")

    port: int = 50054
    metrics_port: int = 9104
    milvus_uri: str = "http://127.0.0.1:19530"
    collection: str = "mesh_documents"
    router_address: str = "127.0.0.1:50052"
    embedder_model: str = "all-minilm-l6-v2"
    dimension: int = 384
    embed_batch: int = 64
    tokenizer_file: str = "triton_models/minilm/1/tokenizer.json"
    # The seed guide says 512-token chunks with 128 overlap; MiniLM reads at most 256 tokens, so a 512-token
    # chunk would be embedded by its first half only. Same overlap ratio (1/4), sized to the embedder.
    chunk_tokens: int = 256
    chunk_overlap_tokens: int = 64
    # Seed guide: HNSW with M=16; efConstruction 200.
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef: int = 64
    max_top_k: int = 100
    max_ef: int = 4096
    max_document_chars: int = 1_000_000
    max_documents_per_batch: int = 256
    max_filter_chars: int = 1024
    milvus_timeout_s: float = 2.0
    # Session: a document is searchable through this process as soon as its upsert returns (read-your-writes),
    # without Strong's wait for the next time tick on every search (slow on a Milvus standalone). Other retrieval
    # replicas see it within Milvus' bounded staleness. "Strong" buys cross-replica freshness for that wait.
    consistency_level: str = "Session"

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.milvus import HnswSettings, MilvusTimeouts
from services.common.settings import RouterClientSettings


class RetrievalSettings(RouterClientSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_RETRIEVAL_", extra="forbid")

    port: int = 50054
    metrics_port: int = 9104
    milvus_uri: str = "http://127.0.0.1:19530"
    collection: str = "mesh_documents"
    # Embeds chunks and queries; its vector size is its registry entry's `dimension` (asked of the router).
    embedder_model: str = "all-minilm-l6-v2"
    embed_batch: int = 64
    # One ingest batch of up to `embed_batch` chunks per request to the embedder.
    embed_timeout_s: float = 60.0
    tokenizer_file: str = "triton_models/minilm/1/tokenizer.json"
    # Chunks follow headings, paragraphs and sentences up to this many tokens, the next repeating up to the
    # overlap (services/retrieval/chunking.py). MiniLM embeds a chunk's first 256 tokens; BM25 reads all of it.
    chunk_tokens: int = 512
    chunk_overlap_tokens: int = 128
    # Small to big: search each chunk by its passages of up to this many tokens (each embedded whole by MiniLM,
    # each matched by BM25 without a long chunk's length penalty) and return it whole. 0 (default): whole
    # chunks. 128 measured: recall@10 +2.6 points, recall@5 equal, +3 ms p50 and ~4x rows (BENCHMARKS.md).
    passage_tokens: int = Field(default=0, ge=0)
    hnsw: HnswSettings = HnswSettings()
    # Hybrid search: create the collection with a BM25 field (Milvus 2.5+ and Lite; false for Milvus 2.3, which
    # has no sparse vectors), and fuse dense and BM25 rankings by reciprocal rank: sum of weight / (k + rank).
    lexical_search: bool = True
    rrf_k: float = Field(default=60.0, gt=0)
    dense_weight: float = Field(default=1.0, ge=0)
    lexical_weight: float = Field(default=1.0, ge=0)
    # Candidates each leg of a hybrid search ranks before fusion; 0: top_k. Deeper lets chunks that both legs rank
    # low outscore one leg's best (on the evaluation set, 20 for top_k 10 cost 4 points of recall@5).
    fusion_depth: int = Field(default=0, ge=0, le=100)
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

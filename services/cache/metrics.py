"""Cache metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Defined once, shared with the gateways' direct reads of exact entries.
from services.cache.reads import LOOKUPS as LOOKUPS

LOOKUP_SECONDS = Histogram("mesh_cache_lookup_duration_seconds", "Cache lookup latency", ["kind"],
                           buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 20))
STORED_BYTES = Counter("mesh_cache_stored_bytes_total", "Bytes written to the cache", ["kind"])
ENTRIES = Gauge("mesh_cache_entries", "Keys in the cache's Redis database")
MEMORY_BYTES = Gauge("mesh_cache_memory_bytes", "Memory used by the cache's Redis")
BACKEND_ERRORS = Counter("mesh_cache_backend_errors_total", "Failed calls to a cache backend", ["backend"])
SEMANTIC_REFUSED = Counter("mesh_cache_semantic_refused_total",
                           "Semantic candidates above the threshold that were not served, by why", ["reason"])
WRONG_HITS = Counter("mesh_cache_wrong_hits_reported_total", "Semantic hits reported as wrong answers")

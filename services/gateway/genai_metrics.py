"""The OpenTelemetry GenAI semantic conventions' metrics, as Prometheus histograms: token usage by tenant, model
and type (gen_ai.client.token.usage), request duration, time to first token and time per output token
(gen_ai.server.*). Recorded for generations a model ran; cache hits used no model and are left out, so the
latency alerts watch the models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import Histogram

from inference_mesh.v1 import mesh_pb2
from services.gateway.budgets import CACHE_HITS

TOKEN_USAGE = Histogram("gen_ai_client_token_usage", "Tokens per generation (gen_ai.client.token.usage), by tenant, "
                        "model and type (input, output)", ["tenant", "model", "type"],
                        buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384))
REQUEST_DURATION = Histogram("gen_ai_server_request_duration_seconds", "Generation time, first byte of the request "
                             "to the last token (gen_ai.server.request.duration)", ["model"],
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60))
TIME_TO_FIRST_TOKEN = Histogram("gen_ai_server_time_to_first_token_seconds", "Request to first token "
                                "(gen_ai.server.time_to_first_token)", ["model"],
                                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10))
TIME_PER_OUTPUT_TOKEN = Histogram("gen_ai_server_time_per_output_token_seconds", "Mean time between output tokens "
                                  "after the first (gen_ai.server.time_per_output_token)", ["model"],
                                  buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5))

async def observed(chunks: AsyncIterator[mesh_pb2.GenerateChunk], tenant: str,
                   model: str) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    started = time.perf_counter()
    first: float | None = None
    async for chunk in chunks:
        if first is None and chunk.text:
            first = time.perf_counter()
        if chunk.finish_reason and chunk.metadata.cache_status not in CACHE_HITS:
            done = time.perf_counter()
            REQUEST_DURATION.labels(model).observe(done - started)
            TOKEN_USAGE.labels(tenant, model, "input").observe(chunk.usage.prompt_tokens)
            TOKEN_USAGE.labels(tenant, model, "output").observe(chunk.usage.completion_tokens)
            if first is not None:
                TIME_TO_FIRST_TOKEN.labels(model).observe(first - started)
                if chunk.usage.completion_tokens > 1:
                    TIME_PER_OUTPUT_TOKEN.labels(model).observe((done - first) / (chunk.usage.completion_tokens - 1))
        yield chunk

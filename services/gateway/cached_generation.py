"""Generate with the cache in front: hits replay as a stream, completed misses are stored, never a failure."""

from __future__ import annotations

from collections.abc import AsyncIterator

from inference_mesh.v1 import cache_pb2, mesh_pb2
from services.gateway.cache_client import CacheClient, is_deterministic
from services.gateway.generation import GenerationStreams, stream_generation
from services.gateway.plan import RequestPlan

_HIT_STATUS = {
    cache_pb2.LOOKUP_RESULT_EXACT_HIT: mesh_pb2.CACHE_STATUS_EXACT_HIT,
    cache_pb2.LOOKUP_RESULT_SEMANTIC_HIT: mesh_pb2.CACHE_STATUS_SEMANTIC_HIT,
}
_COMPLETED = (mesh_pb2.FINISH_REASON_STOP, mesh_pb2.FINISH_REASON_LENGTH)


def replay(cached: cache_pb2.CachedResponse, metadata: mesh_pb2.ResponseMetadata) -> list[mesh_pb2.GenerateChunk]:
    """A cached answer as one chunk: the whole text as a single delta, `token_index` the last token's (the
    contract lets a delta span tokens: "the token that completed this delta"), with finish reason, usage and this
    request's metadata. Replaying the original stream token by token cost one message per token on every hop for
    text the caller gets at once anyway (issue 17: a streamed hit cost ~2.6x a unary one)."""
    last = mesh_pb2.GenerateChunk(text="".join(cached.chunks),
                                  token_index=cached.token_indices[-1] if cached.token_indices else 0,
                                  finish_reason=cached.finish_reason)
    last.usage.CopyFrom(mesh_pb2.Usage(prompt_tokens=cached.prompt_tokens, completion_tokens=cached.completion_tokens,
                                       total_tokens=cached.prompt_tokens + cached.completion_tokens))
    metadata.pool, metadata.replica = cached.pool, cached.replica
    last.metadata.CopyFrom(metadata)
    return [last]


async def generate(
    cache: CacheClient | None,
    streams: GenerationStreams,
    request: mesh_pb2.GenerateRequest,
    plan: RequestPlan,
) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    metadata = plan.metadata

    def generation() -> AsyncIterator[mesh_pb2.GenerateChunk]:
        return stream_generation(streams, request, plan)

    if cache is None or request.cache_mode == mesh_pb2.CACHE_MODE_BYPASS or not is_deterministic(request):
        metadata.cache_status = mesh_pb2.CACHE_STATUS_DISABLED if cache is None else mesh_pb2.CACHE_STATUS_BYPASS
        async for chunk in generation():
            yield chunk
        return

    scope = plan.cache_scope
    if request.cache_mode != mesh_pb2.CACHE_MODE_REFRESH:
        cached = await cache.exact_hit(scope, request)
        if cached is not None:
            metadata.cache_status = mesh_pb2.CACHE_STATUS_EXACT_HIT
            for chunk in replay(cached, metadata):
                yield chunk
            return
    semantic = plan.model.semantic_cache and request.cache_mode == mesh_pb2.CACHE_MODE_DEFAULT \
        and not request.no_semantic_cache
    reply = await cache.lookup(cache_pb2.LookupRequest(
        scope=scope, request=request, semantic=semantic,
        semantic_max_false_hit_rate=plan.model.semantic_max_false_hit_rate,
        refresh=request.cache_mode == mesh_pb2.CACHE_MODE_REFRESH), plan.timeout_s)
    if reply is None:
        metadata.cache_status = mesh_pb2.CACHE_STATUS_UNAVAILABLE
        metadata.degraded.append("cache")
        async for chunk in generation():
            yield chunk
        return
    metadata.degraded.extend(reply.degraded)
    if reply.result in _HIT_STATUS:
        metadata.cache_status = _HIT_STATUS[reply.result]
        metadata.similarity = reply.similarity
        metadata.cache_entry = reply.semantic_entry
        for chunk in replay(reply.response, metadata):
            yield chunk
        return

    metadata.cache_status = mesh_pb2.CACHE_STATUS_MISS
    texts: list[str] = []
    indices: list[int] = []
    final: mesh_pb2.GenerateChunk | None = None
    try:
        async for chunk in generation():
            texts.append(chunk.text)
            indices.append(chunk.token_index)
            if chunk.finish_reason:
                final = chunk
            yield chunk
    finally:
        # Only a completed generation is stored; a failed or cancelled one gives the lease back.
        if final is not None and final.finish_reason in _COMPLETED:
            cache.store(cache_pb2.StoreRequest(scope=scope, request=request, lease=reply.lease, semantic=semantic,
                                               response=cache_pb2.CachedResponse(
                chunks=texts, token_indices=indices, prompt_tokens=final.usage.prompt_tokens,
                completion_tokens=final.usage.completion_tokens, finish_reason=final.finish_reason,
                pool=final.metadata.pool, replica=final.metadata.replica)))
        elif reply.lease:
            cache.release(cache_pb2.ReleaseRequest(scope=scope, request=request, lease=reply.lease))

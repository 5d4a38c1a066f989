"""ResponseCache and CacheAdmin: exact lookups, semantic lookups, leases against stampedes, flushes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from redis.exceptions import RedisError
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import cache_pb2, cache_pb2_grpc, mesh_pb2
from services.cache import keys, metrics
from services.cache.calibration import SemanticCalibration, UncalibratedBudget
from services.cache.gate import Gate
from services.cache.semantic import SemanticIndex
from services.cache.settings import CacheSettings
from services.cache.store import RedisStore
from services.common.deadlines import downstream_timeout
from services.common.embeddings import embed_via_kserve
from services.common.errors import internal_failure, invalid, unavailable

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_COMPLETED = (mesh_pb2.FINISH_REASON_STOP, mesh_pb2.FINISH_REASON_LENGTH)


def _check_name(field: str, value: str) -> None:
    if value and not _NAME.match(value):
        raise invalid(f"{field} must be 1-128 characters of letters, digits and ._:@-")


def _check_scope(scope: cache_pb2.CacheScope) -> None:
    for field in ("tenant", "model", "model_version"):
        value = getattr(scope, field)
        if field != "model_version" and not value:
            raise invalid(f"scope.{field} is required")
        _check_name(f"scope.{field}", value)


@contextlib.contextmanager
def _redis_answers() -> Iterator[None]:
    """Redis down is UNAVAILABLE for the caller (the gateway then goes around the cache), and counted."""
    try:
        yield
    except RedisError as exc:
        metrics.BACKEND_ERRORS.labels("redis").inc()
        raise internal_failure("the cache's Redis is unavailable", exc) from exc


class _VectorMemo:
    """The last few prompt vectors, so that Store does not embed again what Lookup just embedded."""

    def __init__(self, size: int = 1024) -> None:
        self._items: OrderedDict[str, list[float]] = OrderedDict()
        self._size = size

    def get(self, text: str) -> list[float] | None:
        vector = self._items.get(text)
        if vector is not None:
            self._items.move_to_end(text)
        return vector

    def put(self, text: str, vector: list[float]) -> None:
        self._items[text] = vector
        if len(self._items) > self._size:
            self._items.popitem(last=False)


@dataclass(frozen=True)
class SemanticHit:
    response: cache_pb2.CachedResponse
    similarity: float
    entry: str


class ResponseCacheService(cache_pb2_grpc.ResponseCacheServicer):
    def __init__(self, settings: CacheSettings, store: RedisStore, index: SemanticIndex | None,
                 router: service_pb2_grpc.GRPCInferenceServiceStub, calibration: SemanticCalibration,
                 gate: Gate | None) -> None:
        self._settings = settings
        self._gate = gate
        self._calibration = calibration
        self._store = store
        self._index = index
        self._router = router
        self._vectors = _VectorMemo()

    async def _prompt_vector(self, text: str, reuse: bool) -> list[float]:
        vector = self._vectors.get(text) if reuse else None
        if vector is None:
            vectors, _ = await embed_via_kserve(self._router, self._settings.embedder_model, [text], 0,
                                                self._settings.embed_timeout_s)
            vector = vectors[0].tolist()
            self._vectors.put(text, vector)
        return vector

    def _threshold(self, request: cache_pb2.LookupRequest) -> float:
        budget = request.semantic_max_false_hit_rate or self._settings.semantic_max_false_hit_rate
        try:
            return self._calibration.threshold(budget)
        except UncalibratedBudget as exc:
            raise invalid(str(exc)) from exc

    async def _semantic(self, request: cache_pb2.LookupRequest, generation: str, key: str,
                        degraded: list[str]) -> SemanticHit | None:
        """The nearest entry above the calibrated threshold that the content gate lets through and that nobody
        reported as a wrong answer to this question."""
        threshold = self._threshold(request)
        if self._index is None or not self._index.ready:
            degraded.append("semantic-index")
            return None
        text = keys.user_text(request.request)
        if not text:
            return None
        if len(text) > self._settings.semantic_max_chars:
            metrics.SEMANTIC_REFUSED.labels("too_long").inc()
            return None
        try:
            vector = await self._prompt_vector(text, reuse=False)
        except grpc.aio.AioRpcError as exc:
            metrics.BACKEND_ERRORS.labels("embedder").inc()
            log.warning("prompt embedding failed", extra={"error": exc.details()})
            degraded.append("semantic-embedder")
            return None
        scope = request.scope
        try:
            found = await self._index.search(vector, scope.tenant, scope.model, scope.model_version, generation,
                                             keys.context_digest(request.request), self._settings.semantic_candidates)
        except Exception as exc:  # pymilvus raises several types; any failure means: no semantic answer now
            metrics.BACKEND_ERRORS.labels("milvus").inc()
            log.warning("semantic search failed", extra={"error": str(exc)})
            await self._index.mark_unavailable()
            degraded.append("semantic-index")
            return None
        candidates = [c for c in found if c.similarity >= threshold]
        if not candidates:
            return None
        wrong = await self._store.wrong_entries(key)
        for candidate in candidates:
            if candidate.entry in wrong:
                metrics.SEMANTIC_REFUSED.labels("reported").inc()
                continue
            if self._gate is not None and self._gate.conflict(text, candidate.text) is not None:
                metrics.SEMANTIC_REFUSED.labels("gate").inc()
                continue
            cached = await self._store.get_response(candidate.response_key)
            if cached is not None:
                return SemanticHit(cached, candidate.similarity, candidate.entry)
        return None

    async def _wait_for_leader(self, key: str, context: grpc.aio.ServicerContext) -> cache_pb2.CachedResponse | None:
        """Another caller holds the lease for this exact request: wait (bounded) for its result."""
        deadline = time.monotonic() + downstream_timeout(context, self._settings.stampede_wait_s)
        while time.monotonic() < deadline:
            cached = await self._store.get_response(key)
            if cached is not None:
                return cached
            if not await self._store.lease_held(key):
                return None  # the leader gave up; the caller may lead now
            await asyncio.sleep(self._settings.stampede_poll_s)
        return None

    async def Lookup(self, request, context):
        _check_scope(request.scope)
        started = time.perf_counter()
        result = "error"
        try:
            with _redis_answers():
                generation = await self._store.generation(request.scope)
                key = keys.response_key(request.scope, generation, request.request)
                if request.refresh:
                    result = "refresh"
                    return cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_MISS,
                                                 lease=await self._store.take_lease(key, self._settings.lease_s))
                cached = await self._store.get_response(key)
                if cached is not None:
                    result = "exact_hit"
                    return cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_EXACT_HIT, response=cached)
                degraded: list[str] = []
                # The lease comes before the semantic search: an identical request in flight is answered by its
                # own result (an exact hit), never by a semantic match that races with its store.
                lease = await self._store.take_lease(key, self._settings.lease_s)
                if not lease:
                    cached = await self._wait_for_leader(key, context)
                    if cached is not None:
                        result = "exact_hit_after_wait"
                        return cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_EXACT_HIT, response=cached)
                    lease = await self._store.take_lease(key, self._settings.lease_s)
                # The entry may have been stored since the first read (its leader's lease released, or still held
                # after a wait that ran out while the leader was storing): read again, or an identical request
                # would be answered by the semantic row the leader stored with it.
                cached = await self._store.get_response(key)
                if cached is not None:
                    if lease:
                        await self._store.release_lease(key, lease)
                    result = "exact_hit"
                    return cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_EXACT_HIT, response=cached)
                if request.semantic:
                    similar = await self._semantic(request, generation, key, degraded)
                    if similar is not None:
                        if lease:
                            await self._store.release_lease(key, lease)
                        result = "semantic_hit"
                        return cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_SEMANTIC_HIT,
                                                     response=similar.response, similarity=similar.similarity,
                                                     semantic_entry=similar.entry, degraded=degraded)
                result = "miss"
                return cache_pb2.LookupReply(result=cache_pb2.LOOKUP_RESULT_MISS, lease=lease, degraded=degraded)
        finally:
            metrics.LOOKUPS.labels("response", result).inc()
            metrics.LOOKUP_SECONDS.labels("response").observe(time.perf_counter() - started)

    async def Store(self, request, context):
        _check_scope(request.scope)
        if request.response.finish_reason not in _COMPLETED:
            raise invalid("only completed responses (finish_reason STOP or LENGTH) are stored")
        with _redis_answers():
            generation = await self._store.generation(request.scope)
            key = keys.response_key(request.scope, generation, request.request)
            size = await self._store.put_response(key, request.response, self._settings.response_ttl_s)
            metrics.STORED_BYTES.labels("response").inc(size)
            if request.lease:
                await self._store.release_lease(key, request.lease)
        text = keys.user_text(request.request)
        if request.semantic and self._index is not None and self._index.ready and \
                0 < len(text) <= self._settings.semantic_max_chars:
            try:
                vector = await self._prompt_vector(text, reuse=True)
                scope = request.scope
                await self._index.add(keys.semantic_entry(key), vector, scope.tenant, scope.model,
                                      scope.model_version, generation, keys.context_digest(request.request), key,
                                      text, self._settings.response_ttl_s)
            except Exception as exc:  # the exact entry is stored; the semantic one is best effort
                metrics.BACKEND_ERRORS.labels("milvus").inc()
                log.warning("semantic index write failed", extra={"error": str(exc)})
                await self._index.mark_unavailable()
        return cache_pb2.StoreReply(stored=True)

    async def ReportWrongHit(self, request, context):
        _check_scope(request.scope)
        if not re.fullmatch(r"[0-9a-f]{64}", request.semantic_entry):
            raise invalid("semantic_entry must be the 64 hex digits a semantic hit named (LookupReply.semantic_entry)")
        text = keys.user_text(request.request)
        if not text:
            raise invalid("request has no user message: nothing was asked that an entry could answer wrongly")
        if self._index is None or not self._index.ready:
            raise unavailable("the semantic index is unavailable; report the wrong hit again later")
        try:
            candidate_text = await self._index.text_of(request.semantic_entry, request.scope.tenant)
        except Exception as exc:  # pymilvus raises several types
            metrics.BACKEND_ERRORS.labels("milvus").inc()
            raise internal_failure("the semantic index did not answer", exc) from exc
        if candidate_text is None:
            return cache_pb2.ReportWrongHitReply(recorded=False)
        with _redis_answers():
            generation = await self._store.generation(request.scope)
            key = keys.response_key(request.scope, generation, request.request)
            negative = json.dumps({"question": text, "candidate": candidate_text, "entry": request.semantic_entry,
                                   "model": request.scope.model, "reported_at": int(time.time())})
            await self._store.report_wrong(key, request.semantic_entry, negative, self._settings.response_ttl_s,
                                           self._settings.negatives_kept)
        metrics.WRONG_HITS.inc()
        return cache_pb2.ReportWrongHitReply(recorded=True)

    async def Release(self, request, context):
        _check_scope(request.scope)
        with _redis_answers():
            generation = await self._store.generation(request.scope)
            await self._store.release_lease(keys.response_key(request.scope, generation, request.request),
                                            request.lease)
        return cache_pb2.ReleaseReply()

    async def GetEmbeddings(self, request, context):
        _check_scope(request.scope)
        started = time.perf_counter()
        with _redis_answers():
            generation = await self._store.generation(request.scope)
            found = await self._store.get_embeddings(
                [keys.embedding_key(request.scope, generation, t) for t in request.texts])
        hits = sum(v is not None for v in found)
        metrics.LOOKUPS.labels("embedding", "hit").inc(hits)
        metrics.LOOKUPS.labels("embedding", "miss").inc(len(found) - hits)
        metrics.LOOKUP_SECONDS.labels("embedding").observe(time.perf_counter() - started)
        reply = cache_pb2.GetEmbeddingsReply()
        for vector in found:
            reply.embeddings.add().values.extend(vector.tolist() if vector is not None else [])
        return reply

    async def PutEmbeddings(self, request, context):
        _check_scope(request.scope)
        if len(request.texts) != len(request.embeddings):
            raise invalid(f"{len(request.texts)} texts but {len(request.embeddings)} embeddings")
        with _redis_answers():
            generation = await self._store.generation(request.scope)
            size = await self._store.put_embeddings(
                [keys.embedding_key(request.scope, generation, t) for t in request.texts],
                [np.asarray(e.values, dtype=np.float32) for e in request.embeddings], self._settings.embedding_ttl_s)
            metrics.STORED_BYTES.labels("embedding").inc(size)
        return cache_pb2.PutEmbeddingsReply()


class CacheAdminService(cache_pb2_grpc.CacheAdminServicer):
    def __init__(self, store: RedisStore, index: SemanticIndex | None) -> None:
        self._store = store
        self._index = index

    async def Flush(self, request, context):
        if not request.tenant and not request.model:
            raise invalid("name a tenant, a model, or both to flush")
        for field in ("tenant", "model"):
            _check_name(field, getattr(request, field))
        with _redis_answers():
            await self._store.bump(tenant=request.tenant, model=request.model)
        deleted = 0
        if self._index is not None and self._index.ready:
            try:
                deleted = await self._index.delete(tenant=request.tenant, model=request.model)
            except Exception as exc:  # rows of an old generation can never match again: deletion only frees space
                log.warning("semantic flush failed", extra={"error": str(exc)})
        log.info("flushed", extra={"tenant": request.tenant, "model": request.model})
        return cache_pb2.FlushReply(semantic_entries_deleted=deleted)

"""The cache service's lookup (services/cache/service.py) over a store and an index held in memory: exact hits
first, then the nearest semantic candidates above the calibrated threshold, each served only if the gate
explains every difference and nobody reported it as a wrong answer to this question."""

from __future__ import annotations

import pytest

from inference_mesh.v1 import cache_pb2, mesh_pb2
from services.cache import keys
from services.cache.calibration import SemanticCalibration
from services.cache.gate import load_gate
from services.cache.semantic import Candidate
from services.cache.service import ResponseCacheService
from services.cache.settings import CacheSettings

SCOPE = cache_pb2.CacheScope(tenant="t1", model="llm", model_version="1")
ANSWER = cache_pb2.CachedResponse(chunks=["It sank in 1912."], token_indices=[0], prompt_tokens=5,
                                  completion_tokens=5, finish_reason=mesh_pb2.FINISH_REASON_STOP)


def _asked(text: str) -> mesh_pb2.GenerateRequest:
    return mesh_pb2.GenerateRequest(model="llm", max_tokens=8, temperature=0.0,
                                    messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=text)])


class MemoryStore:
    def __init__(self) -> None:
        self.responses: dict[str, cache_pb2.CachedResponse] = {}
        self.wrong: dict[str, set[str]] = {}

    async def generation(self, scope) -> str:
        return "0"

    async def get_response(self, key: str):
        return self.responses.get(key)

    async def take_lease(self, key: str, lease_s: float) -> str:
        return "lease"

    async def release_lease(self, key: str, token: str) -> None:
        pass

    async def wrong_entries(self, key: str) -> set[str]:
        return self.wrong.get(key, set())


class MemoryIndex:
    ready = True

    def __init__(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates

    async def search(self, vector, tenant, model, version, generation, context, limit) -> list[Candidate]:
        return self.candidates[:limit]


def _service(store: MemoryStore, candidates: list[Candidate], gate: bool = True) -> ResponseCacheService:
    service = ResponseCacheService(CacheSettings(), store, MemoryIndex(candidates), None, SemanticCalibration.load(),
                                   load_gate() if gate else None)

    async def vector(text: str, reuse: bool) -> list[float]:
        return [0.0] * 4
    service._prompt_vector = vector
    return service


def _stored(store: MemoryStore, question: str, similarity: float) -> Candidate:
    key = keys.response_key(SCOPE, "0", _asked(question))
    store.responses[key] = ANSWER
    return Candidate(keys.semantic_entry(key), key, similarity, question)


async def _lookup(service: ResponseCacheService, question: str) -> cache_pb2.LookupReply:
    return await service.Lookup(cache_pb2.LookupRequest(scope=SCOPE, request=_asked(question), semantic=True), None)


async def test_the_gate_refuses_the_nearest_candidate_and_the_next_explained_one_answers():
    store = MemoryStore()
    near_miss = _stored(store, "Why did the Titanic sink?", 0.97)
    paraphrase = _stored(store, "When did the Titanic go down?", 0.93)
    explained = _stored(store, "When did the Titanic sink ?", 0.91)
    reply = await _lookup(_service(store, [near_miss, paraphrase, explained]), "When did the Titanic sink?")
    assert reply.result == cache_pb2.LOOKUP_RESULT_SEMANTIC_HIT
    assert reply.semantic_entry == explained.entry, "'why' is not 'when'; 'go down' is not explained"
    assert reply.similarity == pytest.approx(0.91)


async def test_without_the_gate_the_nearest_candidate_would_answer():
    store = MemoryStore()
    near_miss = _stored(store, "Why did the Titanic sink?", 0.97)
    reply = await _lookup(_service(store, [near_miss], gate=False), "When did the Titanic sink?")
    assert reply.semantic_entry == near_miss.entry, "the gate is what refuses it, not the threshold"


async def test_a_reported_wrong_entry_and_one_below_the_threshold_never_answer():
    store = MemoryStore()
    reported = _stored(store, "When did the Titanic sink ?", 0.95)
    store.wrong[keys.response_key(SCOPE, "0", _asked("When did the Titanic sink?"))] = {reported.entry}
    below = _stored(store, "when did the titanic sink", SemanticCalibration.load().threshold(0.01) - 0.01)
    reply = await _lookup(_service(store, [reported, below]), "When did the Titanic sink?")
    assert reply.result == cache_pb2.LOOKUP_RESULT_MISS and reply.lease == "lease"


async def test_an_exact_entry_answers_before_any_semantic_search():
    store = MemoryStore()
    _stored(store, "When did the Titanic sink?", 1.0)
    service = _service(store, [])
    service._index = None  # an exact hit needs no index at all
    reply = await _lookup(service, "When did the Titanic sink?")
    assert reply.result == cache_pb2.LOOKUP_RESULT_EXACT_HIT and reply.response.chunks == ANSWER.chunks

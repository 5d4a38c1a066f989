"""The OpenAI HTTP adapter in process (aiohttp's test server) over a scripted core: the server-sent event framing,
errors before and after the first token, and the refusals the HTTP layer makes itself. The real mesh behind it is
tests/integration/test_openai_api.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.common.errors import MeshError
from services.common.shedding import LoadShedder
from services.common.tenants import Tenant, TenantConfig, Tier, hash_key
from services.gateway.auth import Authenticator
from services.gateway.core import Generation
from services.gateway.openai_http.app import OpenAIApi

KEY = "unit-key"
HEADERS = {"authorization": f"Bearer {KEY}"}
CHAT = {"model": "llm", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


class ScriptedCore:
    """The core's surface the adapter calls, answering with scripted chunks (or failing where told)."""

    def __init__(self, texts: list[str], fail_at: int | None = None, refuse: MeshError | None = None) -> None:
        self.texts = texts
        self.fail_at = fail_at
        self.refuse = refuse
        self.asked: list[mesh_pb2.GenerateRequest] = []
        self.closed = False

    async def output_limit(self, name: str) -> int:
        return 16

    async def _chunks(self, metadata: mesh_pb2.ResponseMetadata) -> AsyncIterator[mesh_pb2.GenerateChunk]:
        try:
            for index, text in enumerate(self.texts):
                if index == self.fail_at:
                    raise MeshError(grpc.StatusCode.UNAVAILABLE, "replica lost")
                yield mesh_pb2.GenerateChunk(text=text, token_index=index)
            yield mesh_pb2.GenerateChunk(
                finish_reason=mesh_pb2.FINISH_REASON_LENGTH, metadata=metadata,
                usage=mesh_pb2.Usage(prompt_tokens=2, completion_tokens=len(self.texts),
                                     total_tokens=2 + len(self.texts)))
        finally:
            self.closed = True

    async def generate(self, caller, request, remaining_s) -> Generation:
        self.asked.append(request)
        if self.refuse is not None:
            raise self.refuse
        metadata = mesh_pb2.ResponseMetadata(request_id="r1", model="llm", model_version="1",
                                             cache_status=mesh_pb2.CACHE_STATUS_MISS, tenant=caller.tenant)
        return Generation(metadata, self._chunks(metadata))

    async def model(self, name, kind):
        return models_pb2.ModelInfo(name=name, kind=kind, dimension=3)


def _auth() -> Authenticator:
    return Authenticator(TenantConfig(tiers={"t": Tier(requests_per_minute=1, burst=1)},
                                      tenants=[Tenant(id="unit", tier="t", api_key_sha256=[hash_key(KEY)])]))


async def _client(core: ScriptedCore, shedder: LoadShedder | None = None, max_body: int = 4096) -> TestClient:
    api = OpenAIApi(_auth(), core, shedder, is_ready=lambda: True, max_body_bytes=max_body)
    client = TestClient(TestServer(api.application()))
    await client.start_server()
    return client


def _events(raw: str) -> list[str]:
    return [block[len("data: "):] for block in raw.split("\n\n") if block]


async def test_a_stream_is_role_deltas_finish_usage_done():
    client = await _client(ScriptedCore(["a", "b", "c"]))
    try:
        response = await client.post("/v1/chat/completions", headers=HEADERS, json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-mesh-cache"] == "miss" and response.headers["x-request-id"] == "r1"
        events = _events(await response.text())
    finally:
        await client.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["a", "b", "c"]
    assert chunks[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 3
    assert {c["id"] for c in chunks} == {"chatcmpl-r1"}


async def test_a_failure_after_the_first_token_is_an_error_event():
    core = ScriptedCore(["a", "b", "c"], fail_at=2)
    client = await _client(core)
    try:
        response = await client.post("/v1/chat/completions", headers=HEADERS, json={**CHAT, "stream": True})
        events = _events(await response.text())
    finally:
        await client.close()
    assert response.status == 200
    assert json.loads(events[-2])["error"] == {"message": "replica lost", "type": "server_error", "param": None,
                                               "code": "service_unavailable"}
    assert events[-1] == "[DONE]" and core.closed


async def test_a_failure_before_the_first_token_is_an_http_status():
    client = await _client(ScriptedCore(["a"], fail_at=0))
    try:
        response = await client.post("/v1/chat/completions", headers=HEADERS, json={**CHAT, "stream": True})
        body = await response.json()
    finally:
        await client.close()
    assert response.status == 503 and body["error"]["code"] == "service_unavailable"


async def test_a_refused_request_carries_retry_after():
    refusal = MeshError(grpc.StatusCode.RESOURCE_EXHAUSTED, "budget spent", (("retry-after", "9"),))
    client = await _client(ScriptedCore([], refuse=refusal))
    try:
        response = await client.post("/v1/chat/completions", headers=HEADERS, json=CHAT)
        body = await response.json()
    finally:
        await client.close()
    assert response.status == 429 and response.headers["retry-after"] == "9"
    assert body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize(("method", "path", "payload", "status"), [
    ("POST", "/v1/chat/completions", "x" * 5000, 413),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/v1/assistants", "{}", 404),
    ("POST", "/v1/chat/completions", "not json", 400),
])
async def test_the_http_layers_own_refusals_are_openai_errors(method, path, payload, status):
    client = await _client(ScriptedCore([]))
    try:
        response = await client.request(method, path, headers={**HEADERS, "content-type": "application/json"},
                                        data=payload)
        body = await response.json()
    finally:
        await client.close()
    assert response.status == status
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_no_key_is_refused_before_the_core():
    core = ScriptedCore(["a"])
    client = await _client(core)
    try:
        response = await client.post("/v1/chat/completions", json=CHAT)
    finally:
        await client.close()
    assert response.status == 401 and not core.asked


async def test_a_gateway_at_capacity_sheds_with_retry_after():
    shedder = LoadShedder("gateway-unit", max_in_flight=1)
    assert shedder.enter()  # another request holds the only place
    client = await _client(ScriptedCore(["a"]), shedder)
    try:
        response = await client.post("/v1/chat/completions", headers=HEADERS, json=CHAT)
        health = await client.get("/health")
    finally:
        await client.close()
    assert response.status == 429 and response.headers["retry-after"] == "1"
    assert health.status == 200, "health checks are never shed"


async def test_a_bug_is_a_500_in_openais_shape_with_the_request_id_and_none_of_its_text():
    class Crashing(ScriptedCore):
        async def generate(self, caller, request, remaining_s):
            raise KeyError("milvus://10.0.3.7:19530 mesh_chunks_v7")

    client = await _client(Crashing(["a"]))
    try:
        response = await client.post("/v1/chat/completions", json=CHAT,
                                     headers={**HEADERS, "x-request-id": "req-7"})
        body = await response.json()
    finally:
        await client.close()
    assert response.status == 500 and body["error"]["type"] == "server_error"
    assert "request id req-7" in body["error"]["message"] and "10.0.3" not in body["error"]["message"]

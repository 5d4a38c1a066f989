"""The OpenAI adapter's parsing, translation and error mapping, and the router's statistics merge, without
servers (the integration suite calls the real mesh: tests/integration/test_openai_api.py)."""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import mesh_pb2, retrieval_pb2
from services.common.errors import MeshError
from services.gateway.openai_http import convert
from services.gateway.openai_http.app import parsed_body
from services.gateway.openai_http.errors import OpenAIError, from_mesh_error
from services.gateway.openai_http.schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from services.router.kserve_metadata import merge_statistics


@pytest.mark.parametrize(("code", "status"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.UNKNOWN, 500),
    (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.DEADLINE_EXCEEDED, 504)])
def test_each_status_has_its_http_status(code, status):
    error = from_mesh_error(MeshError(code, "why"))
    assert error.kind.status == status
    assert error.body() == {"error": {"message": "why", "type": error.kind.type, "param": None,
                                      "code": error.kind.code}}


def test_retry_after_travels_as_a_header():
    error = from_mesh_error(MeshError(grpc.StatusCode.RESOURCE_EXHAUSTED, "spent", (("retry-after", "7"),)))
    assert error.headers == {"retry-after": "7"}


def _chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parsed_body(ChatCompletionRequest, json.dumps(body).encode())


def test_chat_body_to_mesh_request():
    body = _chat(max_completion_tokens=9, temperature=0, seed=4, stop="END", cache_mode="bypass", session_id="s",
                 messages=[{"role": "developer", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    request = convert.chat_request(body, body.output_limit())
    assert [m.role for m in request.messages] == [mesh_pb2.ROLE_SYSTEM, mesh_pb2.ROLE_USER]
    assert request.messages[1].content == "ab"
    assert request.max_tokens == 9 and request.temperature == 0 and request.seed == 4
    assert list(request.stop) == ["END"] and request.cache_mode == mesh_pb2.CACHE_MODE_BYPASS
    assert request.session_id == "s"
    assert not convert.chat_request(_chat(), 5).HasField("temperature")


def test_retrieval_mode_reaches_ask():
    body = _chat(retrieval={"top_k": 3, "mode": "sparse"})
    request = convert.ask_request(body, 16)
    assert request.mode == retrieval_pb2.SEARCH_MODE_SPARSE and request.top_k == 3
    assert convert.ask_request(_chat(retrieval={}), 16).mode == retrieval_pb2.SEARCH_MODE_UNSPECIFIED
    with pytest.raises(OpenAIError) as info:
        _chat(retrieval={"mode": "fuzzy"})
    assert info.value.param == "retrieval.mode"


@pytest.mark.parametrize(("tier", "priority"), [
    ("flex", mesh_pb2.PRIORITY_BATCH), ("default", mesh_pb2.PRIORITY_INTERACTIVE),
    ("priority", mesh_pb2.PRIORITY_INTERACTIVE), (None, mesh_pb2.PRIORITY_INTERACTIVE)])
def test_service_tier_flex_is_batch_priority(tier, priority):
    body = _chat(**({"service_tier": tier} if tier else {}))
    assert convert.chat_request(body, 5).priority == priority


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 3}, "n"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"), ({"max_tokens": "10"}, "max_tokens"),
    ({"stream": "yes"}, "stream"), ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name")])
def test_fields_that_would_change_the_answer_are_refused(fields, param):
    with pytest.raises(OpenAIError) as caught:
        _chat(**fields)
    assert caught.value.kind.status == 400
    assert caught.value.param == param


def test_response_formats_reach_the_mesh_request_with_the_schema_as_sent():
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}},
              "required": ["b", "a"], "additionalProperties": False}
    body = _chat(response_format={"type": "json_schema", "json_schema": {"name": "pair", "schema": schema,
                                                                         "strict": True}})
    answer_format = convert.chat_request(body, 5).response_format
    assert answer_format.type == mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    assert answer_format.name == "pair" and answer_format.strict
    assert list(json.loads(answer_format.schema)["properties"]) == ["b", "a"], "key order is answer order"
    assert (convert.chat_request(_chat(response_format={"type": "json_object"}), 5).response_format.type
            == mesh_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    assert not convert.chat_request(_chat(response_format={"type": "text"}), 5).HasField("response_format")
    with pytest.raises(OpenAIError, match="with retrieval"):
        convert.ask_request(_chat(retrieval={}, response_format={"type": "json_object"}), 16)


def test_not_json_is_a_bad_request():
    with pytest.raises(OpenAIError, match="not valid JSON"):
        parsed_body(ChatCompletionRequest, b"{not json")


def test_a_completion_is_one_user_turn_and_one_prompt():
    body = parsed_body(CompletionRequest, b'{"model": "m", "prompt": ["Say hi."], "max_tokens": 3}')
    request = convert.completion_request(body, body.output_limit())
    assert [(m.role, m.content) for m in request.messages] == [(mesh_pb2.ROLE_USER, "Say hi.")]
    with pytest.raises(OpenAIError, match="one prompt"):
        parsed_body(CompletionRequest, b'{"model": "m", "prompt": ["a", "b"]}')


def test_embeddings_in_base64_are_little_endian_float32():
    body = parsed_body(EmbeddingRequest, b'{"model": "e", "input": "x", "encoding_format": "base64"}')
    vector = [0.25, -1.5, 3.0]
    response = mesh_pb2.EmbedResponse(dimension=3, embeddings=[mesh_pb2.Embedding(values=vector)])
    encoded = convert.embeddings(body, response)["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == vector
    with pytest.raises(OpenAIError, match="3-dimensional"):
        convert.check_dimensions(parsed_body(EmbeddingRequest, b'{"model": "e", "input": "x", "dimensions": 2}'), 3)


def test_statistics_are_summed_over_replicas_per_version():
    def stats(version: str, count: int, ns: int, last: int) -> service_pb2.ModelStatisticsResponse:
        one = service_pb2.ModelStatistics(name="minilm", version=version, last_inference=last,
                                          inference_count=count, execution_count=count)
        one.inference_stats.success.count, one.inference_stats.success.ns = count, ns
        one.batch_stats.add(batch_size=1).compute_infer.count = count
        return service_pb2.ModelStatisticsResponse(model_stats=[one])

    merged = merge_statistics("embedder", [stats("1", 3, 30, 100), stats("1", 2, 20, 200), stats("2", 1, 5, 50)])
    assert [(m.name, m.version) for m in merged] == [("embedder", "1"), ("embedder", "2")]
    assert merged[0].inference_count == 5 and merged[0].last_inference == 200
    assert (merged[0].inference_stats.success.count, merged[0].inference_stats.success.ns) == (5, 50)
    assert [(b.batch_size, b.compute_infer.count) for b in merged[0].batch_stats] == [(1, 5)]

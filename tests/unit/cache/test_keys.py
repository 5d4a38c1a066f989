"""Cache keys: a constrained answer is never the answer to a free-text request or to another schema."""

from __future__ import annotations

from inference_mesh.v1 import mesh_pb2
from services.cache import keys

SCHEMA = '{"type":"object","properties":{"a":{"type":"string"}},"required":["a"]}'


def _request(**answer_format) -> mesh_pb2.GenerateRequest:
    request = mesh_pb2.GenerateRequest(model="m", max_tokens=8, temperature=0.0, messages=[
        mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content="Give me a JSON object.")])
    if answer_format:
        request.response_format.CopyFrom(mesh_pb2.ResponseFormat(**answer_format))
    return request


def test_the_response_format_is_part_of_the_exact_and_the_semantic_keys():
    free = _request()
    any_object = _request(type=mesh_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    schema = _request(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema=SCHEMA)
    strict = _request(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema=SCHEMA, strict=True)
    other = _request(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema=SCHEMA.replace('"a"', '"b"'))
    requests = [free, any_object, schema, strict, other]
    assert len({keys.exact_digest(r) for r in requests}) == 5
    assert len({keys.context_digest(r) for r in requests}) == 5, "a semantic hit needs the same format too"
    assert keys.exact_digest(schema) == keys.exact_digest(_request(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
                                                                   schema=SCHEMA, name="renamed"))


def test_free_text_keys_are_the_ones_they_were():
    # The digest of a free-text request before response formats existed: entries already stored still answer.
    assert keys.exact_digest(_request()) == keys._digest({"messages": keys.messages(_request()), "sampling": {
        "max_tokens": 8, "temperature": 0.0, "top_p": None, "seed": None, "stop": []}})

"""The response-format checker: every keyword is enforced by the decoder, an annotation, or refused with its
path; OpenAI's strict rules; the limits."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_mesh.v1 import mesh_pb2
from services.common.errors import MeshError
from services.gateway.structured_output import ANY_OBJECT, SchemaLimits, check_schema, schema_text

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer"},
    "pet": {"enum": ["cat", "dog"]},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "home": {"$ref": "#/$defs/Address"},
    "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
}, "required": ["name", "age", "pet", "tags", "home", "nick"], "additionalProperties": False,
    "$defs": {"Address": {"type": "object", "properties": {"street": {"type": "string"}},
                          "required": ["street"], "additionalProperties": False, "title": "Address"}}}


def _refusal(schema: object, strict: bool = False, limits: SchemaLimits | None = None) -> str:
    with pytest.raises(MeshError) as caught:
        check_schema(json.dumps(schema), strict, limits or SchemaLimits())
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.message


def test_an_enforced_schema_passes_compact_with_its_key_order_kept():
    text = check_schema(json.dumps(PERSON, indent=2), strict=True)
    assert json.loads(text) == PERSON
    assert list(json.loads(text)["properties"]) == ["name", "age", "pet", "tags", "home", "nick"]
    assert " " not in text.replace("Address", "")


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "string", "format": "email"}, "format 'email'"),
    ({"not": {"type": "string"}}, "not"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"allOf": [{"type": "string"}]}, "allOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties"),
    ({"anyOf": [{"type": "string"}], "maxLength": 3}, "maxLength"),
    ({"$ref": "#/$defs/A", "description": "ok", "minItems": 1, "$defs": {"A": {"type": "string"}}}, "minItems"),
    ({"maxLength": 3}, "with \"type\": \"string\" only"),
    ({"type": "string", "pattern": "[a-z]+"}, "anchored"),
    ({"type": "string", "pattern": "^a$", "maxLength": 3}, "one of pattern"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}}, "prefixItems"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b'"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/Missing"}, "$ref"),
    ({"type": "strin"}, "type 'strin'"),
    ({"type": "string", "enum": ["a", 1]}, "not of type string"),
    ({"description": "only words"}, "give the schema a type"),
    ({"type": "object", "properties": {"a": True}}, "true/false"),
])
def test_what_the_decoder_would_not_enforce_is_refused_by_name(schema, named):
    assert named in _refusal(schema)


def test_a_refusal_says_where():
    message = _refusal({"type": "object", "properties": {"inner": {"type": "object", "properties": {
        "n": {"type": "integer", "maximum": 3}}}}})
    assert "#/properties/inner/properties/n" in message and "maximum" in message


def test_strict_means_closed_objects_with_every_property_required():
    assert "additionalProperties: false" in _refusal({"type": "object", "properties": {"a": {"type": "string"}},
                                                      "required": ["a"]}, strict=True)
    assert "every property" in _refusal({"type": "object", "properties": {"a": {"type": "string"}},
                                         "required": [], "additionalProperties": False}, strict=True)
    assert "root" in _refusal({"type": "array", "items": {"type": "string"}}, strict=True)
    check_schema(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}), strict=False)


def test_limits_on_size_depth_properties_and_enum_values():
    assert "characters" in _refusal({"type": "string", "description": "x" * 100}, limits=SchemaLimits(max_chars=50))
    deep: dict = {"type": "string"}
    for _ in range(12):
        deep = {"type": "array", "items": deep}
    assert "deeper than 10" in _refusal(deep)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5)}}
    assert "more than 4 properties" in _refusal(wide, limits=SchemaLimits(max_properties=4))
    assert "enum values" in _refusal({"enum": list(range(6))}, limits=SchemaLimits(max_enum_values=5))
    with pytest.raises(MeshError, match="not JSON"):
        check_schema("{not json")


def test_response_formats_of_the_mesh_api():
    assert schema_text(mesh_pb2.ResponseFormat()) is None
    assert schema_text(mesh_pb2.ResponseFormat(type=mesh_pb2.ResponseFormat.TYPE_JSON_OBJECT)) == ANY_OBJECT
    named = mesh_pb2.ResponseFormat(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema=json.dumps(PERSON),
                                    name="person", strict=True)
    assert json.loads(schema_text(named)) == PERSON
    with pytest.raises(MeshError, match="name"):
        schema_text(mesh_pb2.ResponseFormat(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema="{}",
                                            name="no spaces"))
    with pytest.raises(MeshError, match="needs type JSON_SCHEMA"):
        schema_text(mesh_pb2.ResponseFormat(schema="{}"))


@pytest.mark.parametrize("schema", [
    {"type": {}}, {"type": ["string", {}]}, {"enum": 3}, {"type": "string", "format": {}},
    {"type": "object", "properties": []}, {"type": "array", "items": 3}, {"anyOf": {}},
    {"$defs": [], "type": "string"}, {"type": "object", "required": "a"},
    {"type": "object", "additionalProperties": []}, {"type": "string", "maxLength": "3"},
])
def test_a_malformed_schema_is_a_400_never_an_exception(schema):
    _refusal(schema)


_KEYS = st.sampled_from(["type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "$ref",
                         "$defs", "format", "pattern", "minLength", "maxLength", "minItems", "maxItems",
                         "additionalProperties", "description", "minimum", "a"])
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.sampled_from(
    ["string", "object", "array", "integer", "#/$defs/a", "^a$", "date"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4), max_leaves=20)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(schema=st.dictionaries(_KEYS, _JSON, max_size=5))
def test_any_json_object_is_accepted_or_refused_with_a_400(schema):
    try:
        check_schema(json.dumps(schema))
    except MeshError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT

"""Structured outputs on the real stack: JSON-schema-constrained decoding on the CPU pool (llama.cpp's grammar),
called through Envoy with the official openai SDK and LangChain, through the gRPC API, and through the KServe
contract's `json_schema` input; every answer held to its schema by an independent validator (jsonschema)."""

from __future__ import annotations

import datetime
import enum
import json
import re
from typing import Annotated

import grpc
import httpx
import jsonschema
import numpy as np
import openai
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from services.common.kserve import SCHEMA_INPUT, InferRequestBuilder, output_arrays
from tests.conftest import AUTH, LLM, chat, triton_metric
from tests.integration.test_openai_api import KEY, _client, _trust
from tools.stack import LocalStack

INFERENCES = "nv_inference_request_success"


class Colour(enum.StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


# Every string and list bounded: a greedy 135M model can repeat a word inside a string until max_tokens (seen:
# "Bloem-Bloem-..."), which no grammar prevents; within bounds the grammar closes the string and the answer ends.
class Address(BaseModel):
    city: str = Field(max_length=24)
    postcode: str | None = Field(max_length=10)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int
    favourite: Colour
    hobbies: list[Annotated[str, Field(max_length=16)]] = Field(max_length=3)
    home: Address
    nickname: str | None = Field(max_length=16)


@pytest.fixture(scope="module")
def client(stack: LocalStack):
    with _client(stack) as c:
        yield c


@pytest.fixture(scope="module")
def mesh(stack: LocalStack):
    with grpc.insecure_channel(stack.gateway_address) as channel:
        yield mesh_pb2_grpc.InferenceMeshStub(channel)


def _json_schema(schema: dict, name: str = "answer", strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def test_sdk_parse_fills_a_pydantic_model_with_nested_objects_enums_arrays_and_optionals(client):
    completion = client.chat.completions.parse(
        model=LLM, messages=[{"role": "user", "content": "Invent a person who lives in Paris."}],
        response_format=Person, max_tokens=200, temperature=0, extra_body={"cache_mode": "bypass"})
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.home, Address) and isinstance(person.favourite, Colour)
    jsonschema.validate(json.loads(choice.message.content), to_strict_json_schema(Person))


def test_a_strict_schema_answer_validates_whole_and_streamed(client):
    schema = to_strict_json_schema(Person)
    body = dict(model=LLM, messages=[{"role": "user", "content": "Describe a gardener."}], max_tokens=200,
                temperature=0, response_format=_json_schema(schema), extra_body={"cache_mode": "bypass"})
    whole = client.chat.completions.create(**body)
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    streamed = client.chat.completions.create(**body, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content, "greedy: the stream is the whole answer in pieces"
    with client.chat.completions.stream(model=LLM, messages=body["messages"], max_tokens=200, temperature=0,
                                        response_format=Person, extra_body={"cache_mode": "bypass"}) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


def test_json_object_is_an_object(client):
    answer = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "List two fruits with their colours."}], max_tokens=120,
        temperature=0, response_format={"type": "json_object"}, extra_body={"cache_mode": "bypass"})
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_langchain_with_structured_output(stack):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model=LLM, api_key=KEY, base_url=f"https://localhost:{stack.ports.edge}/v1", temperature=0,
                       max_tokens=200, max_retries=0, http_client=httpx.Client(verify=_trust(stack)))
    person = model.with_structured_output(Person, method="json_schema", strict=True).invoke(
        "Invent a person who likes painting.")
    assert isinstance(person, Person)


def test_a_constrained_answer_is_never_the_answer_to_a_free_text_request(client):
    messages = [{"role": "user", "content": "Say something about the sea."}]
    schema = {"type": "object", "properties": {"fact": {"type": "string", "maxLength": 40}}, "required": ["fact"],
              "additionalProperties": False}
    first = client.chat.completions.with_raw_response.create(
        model=LLM, messages=messages, max_tokens=60, temperature=0, response_format=_json_schema(schema),
        extra_body={"cache_mode": "refresh"})
    constrained = first.parse().choices[0].message.content
    again = client.chat.completions.with_raw_response.create(
        model=LLM, messages=messages, max_tokens=60, temperature=0, response_format=_json_schema(schema))
    assert again.headers["x-mesh-cache"] == "exact-hit" and again.parse().choices[0].message.content == constrained
    free = client.chat.completions.with_raw_response.create(model=LLM, messages=messages, max_tokens=60,
                                                             temperature=0)
    assert free.headers["x-mesh-cache"] != "exact-hit"
    other = dict(schema, properties={"claim": schema["properties"]["fact"]}, required=["claim"])
    renamed = client.chat.completions.with_raw_response.create(
        model=LLM, messages=messages, max_tokens=60, temperature=0, response_format=_json_schema(other))
    assert renamed.headers["x-mesh-cache"] != "exact-hit"
    assert "claim" in json.loads(renamed.parse().choices[0].message.content)


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}, "minimum"),
    ({"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}, "email"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
])
def test_a_schema_the_decoder_cannot_enforce_is_a_400_and_reaches_no_engine(client, stack, schema, named):
    before = triton_metric(stack, INFERENCES)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       response_format=_json_schema(schema, strict=False))
    assert named in caught.value.message
    deep: dict = {"type": "string"}
    for _ in range(12):
        deep = {"type": "array", "items": deep}
    with pytest.raises(openai.BadRequestError, match="deeper than 10"):
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       response_format=_json_schema({"type": "object", "properties": {"d": deep}},
                                                                    strict=False))
    assert triton_metric(stack, INFERENCES) == before


def test_kserve_callers_send_the_schema_as_the_json_schema_input(stack):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    messages = json.dumps([{"role": "user", "content": "Pick a colour and a count."}]).encode()
    with grpc.insecure_channel(stack.gateway_address) as channel:
        kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def infer(schema_text: str):
            builder = InferRequestBuilder("smollm2-135m-instruct").add_bytes("messages", [messages])
            builder.add_bytes(SCHEMA_INPUT, [schema_text.encode()])
            builder.add_array("max_tokens", np.array([60], dtype=np.int32))
            builder.add_array("temperature", np.array([0.0], dtype=np.float32))
            return list(kserve.ModelStreamInfer(iter([builder.build()]), metadata=AUTH, timeout=120))

        responses = infer(json.dumps(schema))
        assert not any(r.error_message for r in responses), [r.error_message for r in responses]
        text = "".join(output_arrays(r.infer_response)["text_output"].reshape(-1)[0].decode() for r in responses)
        jsonschema.validate(json.loads(text), schema)
        with pytest.raises(grpc.RpcError) as caught:
            infer(json.dumps({"type": "integer", "maximum": 3}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum" in caught.value.details()


def test_a_model_whose_pools_cannot_constrain_refuses_with_the_capability_named(client, stack):
    """The registry without `supports` on the CPU placement: the request is refused before any engine, never
    answered unconstrained."""
    registry_file = stack.registry_path
    original = registry_file.read_text()
    registry = yaml.safe_load(original)
    for placement in registry["models"][LLM]["pools"]:
        if isinstance(placement, dict):
            placement.pop("supports", None)
    with grpc.insecure_channel(stack.router_address) as channel:
        admin = router_pb2_grpc.RouterAdminStub(channel)
        try:
            registry_file.write_text(yaml.safe_dump(registry))
            assert admin.ReloadRegistry(router_pb2.ReloadRequest(), timeout=5).changed
            before = triton_metric(stack, INFERENCES)
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=8, response_format={"type": "json_object"})
            assert "structured_output" in caught.value.message
            assert triton_metric(stack, INFERENCES) == before
            free = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=4, extra_body={"cache_mode": "bypass"})
            assert free.choices[0].message.content is not None
        finally:
            registry_file.write_text(original)
            admin.ReloadRegistry(router_pb2.ReloadRequest(), timeout=5)


# Random schemas of the enforced subset, bounded so a greedy 135M model finishes them within max_tokens (strings
# and arrays have maximum lengths): the property is that whatever it writes then validates.
_NAMES = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)
_LEAVES = st.one_of(
    st.just({"type": "integer"}), st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.just({"type": "number"}),
    st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}),
    st.sampled_from(["date", "time", "date-time", "uuid"]).map(lambda f: {"type": "string", "format": f}),
    st.just({"type": "string", "pattern": "^[A-Z][a-z]{2,5}$"}),
)


def _composite(children: st.SearchStrategy) -> st.SearchStrategy:
    objects = st.dictionaries(_NAMES, children, min_size=1, max_size=3).flatmap(
        lambda properties: st.sets(st.sampled_from(sorted(properties))).map(lambda required: {
            "type": "object", "properties": properties, "required": sorted(required),
            "additionalProperties": False}))
    arrays = st.tuples(children, st.integers(0, 1), st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": max(t[1], t[2])})
    unions = st.lists(children, min_size=2, max_size=3).map(lambda branches: {"anyOf": branches})
    return st.one_of(objects, arrays, unions)


# RFC 3339 and RFC 4122 as written (jsonschema checks "time" only with an optional package, and its default
# FormatChecker mixes in draft 3's "time", HH:MM:SS only).
_TIME = r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)"
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date", raises=ValueError)
def _date(value: object) -> bool:
    return not isinstance(value, str) or (re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) is not None
                                          and datetime.date.fromisoformat(value) is not None)


@FORMATS.checks("time")
def _time(value: object) -> bool:
    return not isinstance(value, str) or re.fullmatch(_TIME, value) is not None


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or ("T" in value and _date(value.split("T", 1)[0])
                                          and _time(value.split("T", 1)[1]))


@FORMATS.checks("uuid")
def _uuid(value: object) -> bool:
    return not isinstance(value, str) or re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}",
                                                      value) is not None


SCHEMAS = st.recursive(_LEAVES, _composite, max_leaves=6).map(
    lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"value": s},
                                                   "required": ["value"], "additionalProperties": False})


@settings(max_examples=16, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=SCHEMAS)
def test_whatever_the_schema_the_cpu_pools_answer_validates(mesh, schema):
    request = chat("Fill in this JSON.", max_tokens=400, temperature=0.0, cache_mode=mesh_pb2.CACHE_MODE_BYPASS,
                   response_format=mesh_pb2.ResponseFormat(type=mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
                                                           schema=json.dumps(schema)))
    chunks = list(mesh.Generate(request, metadata=AUTH, timeout=120))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == mesh_pb2.FINISH_REASON_STOP, (schema, text)
    jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)

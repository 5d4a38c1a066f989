"""Structured outputs on the real stack: JSON-schema-constrained decoding on the CPU pool (llama.cpp's grammar),
called through Envoy with the official openai SDK and LangChain, through the gRPC API, and through the KServe
contract's `json_schema` input; every answer held to its schema by an independent validator (jsonschema)."""

from __future__ import annotations

import datetime
import enum
import json
import re
import time
from typing import Annotated, Literal

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


def inferences_settled(stack: LocalStack) -> float:
    """Triton's count of finished inferences once it stops moving: a request counts when its execute returns,
    which is after its last response (the model saves its prefix state then), so the previous test's last
    request may still be counted a moment after its client had the answer."""
    last = triton_metric(stack, INFERENCES)
    for _ in range(50):
        time.sleep(0.2)
        now = triton_metric(stack, INFERENCES)
        if now == last:
            return now
        last = now
    return last


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
    before = inferences_settled(stack)
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
            before = inferences_settled(stack)
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


# Tools: each call's arguments are decoded under its tool's parameters.
class GetWeather(BaseModel):
    """The weather now in a city."""

    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """The time now in a timezone."""

    zone: Literal["UTC", "CET", "JST"]


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather now in a city",
                                                 "parameters": to_strict_json_schema(GetWeather), "strict": True}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now in a timezone",
                                              "parameters": to_strict_json_schema(GetTime), "strict": True}}
TOOL_MODELS = {"get_weather": GetWeather, "get_time": GetTime}


def _checked_calls(message) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        TOOL_MODELS[call.function.name].model_validate_json(call.function.arguments)
    return message.tool_calls


def test_a_tool_round_trip_call_result_and_final_answer(client):
    messages = [{"role": "user", "content": "What is the weather in Oslo, in celsius?"}]
    first = client.chat.completions.create(model=LLM, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice="required", max_tokens=120, temperature=0,
                                           extra_body={"cache_mode": "bypass"})
    assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
    calls = _checked_calls(first.choices[0].message)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": call.id, "content": "4 degrees, light rain"} for call in calls]
    final = client.chat.completions.create(model=LLM, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice="none", max_tokens=40, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    named = client.chat.completions.create(model=LLM, messages=messages[:1], tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=60, temperature=0)
    assert [c.function.name for c in _checked_calls(named.choices[0].message)] == ["get_time"]


def test_streamed_tool_call_deltas_are_reassembled_by_the_sdk(client):
    with client.chat.completions.stream(
            model=LLM, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
            tools=[openai.pydantic_function_tool(GetTime, name="get_time"),
                   openai.pydantic_function_tool(GetWeather, name="get_weather")],
            tool_choice="required", max_tokens=120, temperature=0) as stream:
        kinds = {type(event).__name__ for event in stream}
        final = stream.get_final_completion()
    assert "FunctionToolCallArgumentsDoneEvent" in kinds, kinds
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in _checked_calls(choice.message):
        assert isinstance(call.function.parsed_arguments, TOOL_MODELS[call.function.name])


def test_tools_through_the_grpc_api_come_back_as_typed_calls(mesh):
    request = chat("What is the weather in Rome?", max_tokens=80, temperature=0.0,
                   cache_mode=mesh_pb2.CACHE_MODE_BYPASS,
                   tools=[mesh_pb2.Tool(name="get_weather", parameters=json.dumps(to_strict_json_schema(GetWeather)),
                                        strict=True)],
                   tool_choice=mesh_pb2.ToolChoice(mode=mesh_pb2.ToolChoice.MODE_REQUIRED))
    chunks = list(mesh.Generate(request, metadata=AUTH, timeout=120))
    last = chunks[-1]
    assert last.finish_reason == mesh_pb2.FINISH_REASON_TOOL_CALLS and not "".join(c.text for c in chunks)
    assert [GetWeather.model_validate_json(c.arguments) for c in last.tool_calls]
    assert last.usage.completion_tokens > 0


def test_langchain_agent_loop_with_two_tools(stack):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran: list[str] = []

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather now in a city."""
        ran.append("get_weather")
        return f"12 degrees {unit} in {city}"

    @tool
    def get_time(zone: Literal["UTC", "CET", "JST"]) -> str:
        """The time now in a timezone."""
        ran.append("get_time")
        return f"10:00 {zone}"

    model = ChatOpenAI(model=LLM, api_key=KEY, base_url=f"https://localhost:{stack.ports.edge}/v1", temperature=0,
                       max_tokens=120, max_retries=0, http_client=httpx.Client(verify=_trust(stack)))
    tools = {"get_weather": get_weather, "get_time": get_time}
    history = [HumanMessage("What is the weather in Lisbon and what time is it in UTC?")]
    # Each turn must call a tool (a 135M model left to choose answers in text); the loop ends with a text answer.
    for _ in range(2):
        answer = model.bind_tools(list(tools.values()), tool_choice="any").invoke(history)
        assert answer.tool_calls
        history.append(answer)
        for call in answer.tool_calls:
            history.append(ToolMessage(tools[call["name"]].invoke(call["args"]), tool_call_id=call["id"]))
    final = model.bind_tools(list(tools.values()), tool_choice="none").invoke(history)
    assert final.content and not final.tool_calls
    assert ran, "the tools ran with arguments the model produced"


def test_an_unknown_tool_choice_is_a_400_before_any_engine(client, stack):
    before = inferences_settled(stack)
    with pytest.raises(openai.BadRequestError, match="launch"):
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "launch"}})
    with pytest.raises(openai.BadRequestError, match="minimum"):
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {
                                           "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}])
    assert triton_metric(stack, INFERENCES) == before


def test_a_constrained_stream_resumed_on_another_replica_continues_token_for_token(stack):
    """What the router does after a replica dies mid-stream (resume_tokens: the ids already sent), straight to
    Triton: the grammar is replayed over the resumed tokens, so a greedy constrained answer goes on exactly as the
    uninterrupted one did and stays valid."""
    schema = {"type": "object", "properties": {
        "keeper": {"type": "string", "maxLength": 30},
        "events": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}},
        "required": ["keeper", "events"], "additionalProperties": False}
    messages = json.dumps([{"role": "user", "content": "A lighthouse keeper's night, as JSON."}]).encode()

    def run(resume: list[int]) -> tuple[list[int], str, str]:
        builder = InferRequestBuilder("smollm2").add_bytes("messages", [messages])
        builder.add_bytes(SCHEMA_INPUT, [json.dumps(schema).encode()])
        builder.add_array("max_tokens", np.array([120], dtype=np.int32))
        builder.add_array("temperature", np.array([0.0], dtype=np.float32))
        if resume:
            builder.add_array("resume_tokens", np.array(resume, dtype=np.int32))
        with grpc.insecure_channel(f"127.0.0.1:{stack.ports.tritons[0].grpc}") as channel:
            triton = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            responses = list(triton.ModelStreamInfer(iter([builder.build()]), timeout=120))
        assert not any(r.error_message for r in responses), responses[-1].error_message
        arrays = [output_arrays(r.infer_response) for r in responses]
        ids = [int(t) for a in arrays for t in a["token_id"].reshape(-1)]
        text = "".join(a["text_output"].reshape(-1)[0].decode() for a in arrays)
        return ids, text, arrays[-1]["finish_reason"].reshape(-1)[0].decode()

    ids, text, finish = run([])
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)
    cut = len(ids) // 2
    resumed_ids, resumed_text, resumed_finish = run(ids[:cut])
    assert resumed_ids == ids[cut:] and resumed_finish == "stop"
    assert text.endswith(resumed_text) and resumed_text

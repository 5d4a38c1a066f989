"""Tool calling in the gateway: the calls' schema, the checks, and an answer read back into calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from inference_mesh.v1 import mesh_pb2
from services.common.errors import MeshError
from services.gateway.tools import MAX_PARALLEL_CALLS, calls_schema, check_tools, read_calls, with_tool_calls

WEATHER = mesh_pb2.Tool(name="get_weather", description="Weather in a city", parameters=json.dumps({
    "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
    "$defs": {"City": {"type": "string", "maxLength": 30}}}))
TIME = mesh_pb2.Tool(name="get_time", parameters=json.dumps({"type": "object", "properties": {
    "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}))


def _request(mode=mesh_pb2.ToolChoice.MODE_AUTO, function: str = "", **fields) -> mesh_pb2.GenerateRequest:
    return mesh_pb2.GenerateRequest(model="m", max_tokens=8, tools=[WEATHER, TIME],
                                    tool_choice=mesh_pb2.ToolChoice(mode=mode, function=function), **fields)


def test_the_calls_schema_admits_each_tools_calls_and_nothing_else():
    schema = json.loads(calls_schema(_request()))
    jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                        {"name": "get_time", "arguments": {"zone": "UTC"}}]}, schema)
    for wrong in ({"tool_calls": []},
                  {"tool_calls": [{"name": "get_time", "arguments": {"zone": "PST"}}]},
                  {"tool_calls": [{"name": "get_weather", "arguments": {"city": "x" * 31}}]},
                  {"tool_calls": [{"name": "launch", "arguments": {}}]},
                  {"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}] * (MAX_PARALLEL_CALLS + 1)}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    assert "t0_City" in schema["$defs"], "a tool's $defs move under the root, where its refs resolve"


def test_a_named_function_or_no_parallel_calls_means_one_call():
    named = json.loads(calls_schema(_request(mesh_pb2.ToolChoice.MODE_FUNCTION, "get_time")))
    assert named["properties"]["tool_calls"]["maxItems"] == 1
    assert named["properties"]["tool_calls"]["items"]["properties"]["name"] == {"const": "get_time"}
    single = json.loads(calls_schema(_request(parallel_tool_calls=False)))
    assert single["properties"]["tool_calls"]["maxItems"] == 1


@pytest.mark.parametrize(("request_", "named"), [
    (_request(mesh_pb2.ToolChoice.MODE_FUNCTION, "launch"), "'launch'"),
    (mesh_pb2.GenerateRequest(tool_choice=mesh_pb2.ToolChoice(mode=mesh_pb2.ToolChoice.MODE_REQUIRED)), "no tools"),
    (mesh_pb2.GenerateRequest(tools=[WEATHER, WEATHER]), "unique"),
    (mesh_pb2.GenerateRequest(tools=[mesh_pb2.Tool(name="f", description="d" * 1025)]), "description"),
    (mesh_pb2.GenerateRequest(tools=[mesh_pb2.Tool(name=f"f{i}", description="d" * 1000) for i in range(40)]),
     "characters"),
    (mesh_pb2.GenerateRequest(tools=[mesh_pb2.Tool(name="a b")]), "tools[0].name"),
    (mesh_pb2.GenerateRequest(tools=[mesh_pb2.Tool(name="f", parameters='{"type": "array"}')]), "an object"),
    (mesh_pb2.GenerateRequest(tools=[mesh_pb2.Tool(name="f", parameters=json.dumps({
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}))]), "minimum"),
    (mesh_pb2.GenerateRequest(tools=[WEATHER], response_format=mesh_pb2.ResponseFormat(
        type=mesh_pb2.ResponseFormat.TYPE_JSON_OBJECT)), "not both"),
])
def test_bad_tools_are_refused_with_the_reason(request_, named):
    with pytest.raises(MeshError) as caught:
        check_tools(request_)
    assert named in caught.value.message


def test_an_answer_is_calls_only_after_the_marker():
    calls = read_calls('<tool_call>{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    assert calls[0].id.startswith("call_")
    assert read_calls("The time is noon.") is None


async def _chunks(*pieces: tuple[str, int]):
    for text, finish in pieces:
        yield mesh_pb2.GenerateChunk(text=text, finish_reason=finish)


async def test_a_streamed_text_answer_passes_and_a_call_is_held_to_the_end():
    stop = mesh_pb2.FINISH_REASON_STOP
    text = [c async for c in with_tool_calls(_chunks(("<to", 0), ("day", 0), (" is fine", 0), ("", stop)))]
    assert "".join(c.text for c in text) == "<today is fine" and text[-1].finish_reason == stop
    call = '<tool_call>{"tool_calls": [{"name": "get_time", "arguments": {"zone": "CET"}}]}'
    held = [c async for c in with_tool_calls(_chunks((call[:5], 0), (call[5:20], 0), (call[20:], 0), ("", stop)))]
    assert len(held) == 1 and held[0].finish_reason == mesh_pb2.FINISH_REASON_TOOL_CALLS and not held[0].text
    assert held[0].tool_calls[0].name == "get_time"
    cut = [c async for c in with_tool_calls(_chunks((call[:30], 0), ("", mesh_pb2.FINISH_REASON_LENGTH)))]
    assert cut[-1].text == call[:30] and cut[-1].finish_reason == mesh_pb2.FINISH_REASON_LENGTH

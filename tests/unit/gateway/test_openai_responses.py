"""The Responses API's request items to the mesh's request, and its stream's events in the SDK's order."""

from __future__ import annotations

import json

from inference_mesh.v1 import mesh_pb2
from services.gateway.openai_http import responses
from services.gateway.openai_http.app import parsed_body
from services.gateway.openai_http.schema import ResponsesRequest


def _body(**fields) -> ResponsesRequest:
    return parsed_body(ResponsesRequest, json.dumps({"model": "m", "input": "hi", **fields}).encode())


def test_instructions_items_calls_and_results_become_the_conversation():
    body = _body(instructions="Be brief.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"}],
        tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        text={"format": {"type": "json_object"}})
    request = responses.generate_request(body, 16)
    assert [m.role for m in request.messages] == [mesh_pb2.ROLE_SYSTEM, mesh_pb2.ROLE_USER,
                                                  mesh_pb2.ROLE_ASSISTANT, mesh_pb2.ROLE_TOOL]
    assert [c.id for c in request.messages[2].tool_calls] == ["call_1", "call_2"], "parallel calls: one turn"
    assert request.messages[3].tool_call_id == "call_1"
    assert request.tool_choice.mode == mesh_pb2.ToolChoice.MODE_FUNCTION and not request.parallel_tool_calls
    assert request.response_format.type == mesh_pb2.ResponseFormat.TYPE_JSON_OBJECT


def test_a_stored_conversation_continues_before_the_new_input_and_keeps_no_instructions():
    history = [mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content="Hi"),
               mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_ASSISTANT, content="Hello!")]
    body = _body(instructions="Be brief.", input="And now?", previous_response_id="resp_" + "0" * 24)
    request = responses.generate_request(body, 16, history)
    assert [m.content for m in request.messages] == ["Be brief.", "Hi", "Hello!", "And now?"]
    kept = responses.conversation(body, request, "Now this.", mesh_pb2.GenerateChunk())
    assert [m.content for m in kept] == ["Hi", "Hello!", "And now?", "Now this."]
    assert kept[-1].role == mesh_pb2.ROLE_ASSISTANT


async def test_stream_events_open_items_before_their_content_and_complete_last():
    envelope = responses.ResponseEnvelope(_body(), "resp_" + "1" * 24, stored=True)
    kept: list[str] = []

    async def finished(text: str, last: mesh_pb2.GenerateChunk, answer: dict) -> None:
        kept.append(text)

    async def chunks():
        yield mesh_pb2.GenerateChunk(text="Hel")
        yield mesh_pb2.GenerateChunk(text="lo")
        yield mesh_pb2.GenerateChunk(finish_reason=mesh_pb2.FINISH_REASON_STOP,
                                     usage=mesh_pb2.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))

    events = [event async for event in envelope.events(chunks(), finished)]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["usage"]["output_tokens"] == 2
    assert kept == ["Hello"] and final["store"] is True

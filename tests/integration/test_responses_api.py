"""The Responses API through Envoy with the official openai SDK: text, JSON-schema outputs parsed into Pydantic
models, function tools whole and streamed, a tool round trip; the same generation as chat completions."""

from __future__ import annotations

import json

import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema

from tests.conftest import KEYS, LLM
from tests.integration.test_openai_api import _client
from tests.integration.test_structured_output import GetTime, GetWeather, Person
from tools.stack import LocalStack

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather now in a city",
           "parameters": to_strict_json_schema(GetWeather), "strict": True}
TIME = {"type": "function", "name": "get_time", "description": "The time now in a timezone",
        "parameters": to_strict_json_schema(GetTime), "strict": True}


@pytest.fixture(scope="module")
def client(stack: LocalStack):
    with _client(stack) as c:
        yield c


def test_a_text_response_is_the_chat_completions_answer(client):
    question = "Name three colours."
    answer = client.responses.create(model=LLM, input=question, max_output_tokens=24, temperature=0,
                                     extra_body={"cache_mode": "bypass"})
    chat = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": question}],
                                          max_tokens=24, temperature=0, extra_body={"cache_mode": "bypass"})
    assert answer.object == "response" and answer.id.startswith("resp_")
    assert answer.output_text == chat.choices[0].message.content
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    assert answer.usage.output_tokens == 24 and answer.usage.input_tokens == chat.usage.prompt_tokens
    streamed = client.responses.create(model=LLM, input=question, max_output_tokens=24, temperature=0, stream=True,
                                       extra_body={"cache_mode": "bypass"})
    events = list(streamed)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer.output_text
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"


def test_parse_and_stream_into_a_pydantic_model(client):
    parsed = client.responses.parse(model=LLM, input="Invent a person who lives in Paris.", text_format=Person,
                                    max_output_tokens=200, temperature=0, extra_body={"cache_mode": "bypass"})
    assert isinstance(parsed.output_parsed, Person)
    with client.responses.stream(model=LLM, input="Invent a person who lives in Rome.", text_format=Person,
                                 max_output_tokens=200, temperature=0) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Person)


def test_function_tools_whole_streamed_and_a_round_trip(client):
    question = {"role": "user", "content": "What is the weather in Oslo, in celsius?"}
    first = client.responses.create(model=LLM, input=[question], tools=[WEATHER, TIME], tool_choice="required",
                                    max_output_tokens=120, temperature=0, extra_body={"cache_mode": "bypass"})
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(c.call_id.startswith("call_") for c in calls)
    for call in calls:
        {"get_weather": GetWeather, "get_time": GetTime}[call.name].model_validate_json(call.arguments)
    follow_up = [question, *[c.model_dump(exclude_none=True) for c in calls],
                 *[{"type": "function_call_output", "call_id": c.call_id, "output": "4 degrees, rain"} for c in calls]]
    final = client.responses.create(model=LLM, input=follow_up, tools=[WEATHER, TIME], tool_choice="none",
                                    max_output_tokens=40, temperature=0)
    assert final.output_text and not [i for i in final.output if i.type == "function_call"]
    with client.responses.stream(model=LLM, input="What time is it in Tokyo?", tools=[TIME, WEATHER],
                                 tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=80,
                                 temperature=0) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    (call,) = [item for item in streamed.output if item.type == "function_call"]
    assert call.name == "get_time" and GetTime.model_validate(json.loads(call.arguments))


def test_a_stored_response_continues_a_conversation_and_is_read_and_deleted(client):
    first = client.responses.create(model=LLM, input="My name is Ada. Say hello to me.", max_output_tokens=24,
                                    temperature=0, instructions="Be brief.")
    assert first.store is True and first.id.startswith("resp_")
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    follow = client.responses.create(model=LLM, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=24, temperature=0)
    assert follow.previous_response_id == first.id
    # The stored turns went in before the new one: the prompt is the first exchange plus the question.
    whole = client.responses.create(model=LLM, max_output_tokens=24, temperature=0, store=False, input=[
        {"role": "user", "content": "My name is Ada. Say hello to me."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert follow.output_text == whole.output_text
    assert follow.usage.input_tokens == whole.usage.input_tokens
    events = list(client.responses.create(model=LLM, input="And again?", previous_response_id=follow.id,
                                          max_output_tokens=8, temperature=0, stream=True))
    streamed = events[-1].response   # response.incomplete: cut at max_output_tokens, and kept all the same
    assert events[-1].type == "response.incomplete"
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(model=LLM, input="hi", store=False, max_output_tokens=4)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_another_tenants_response_is_not_found(client, stack):
    mine = client.responses.create(model=LLM, input="A secret: 4217.", max_output_tokens=8, temperature=0)
    with _client(stack, KEYS["tenant-b"]) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(mine.id)
        with pytest.raises(openai.BadRequestError, match="no response"):
            other.responses.create(model=LLM, input="What was the secret?", previous_response_id=mine.id,
                                   max_output_tokens=8)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(mine.id)
        for forged in ("resp_../../mesh:resp:*", "resp_" + "0" * 24 + "*", mine.id.upper()):
            # A path the edge normalises away is a 400 there; any other id is not found: never 200.
            with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
                other.responses.retrieve(forged)
    assert client.responses.retrieve(mine.id).output_text == mine.output_text, "untouched by the other tenant"

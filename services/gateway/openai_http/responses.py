"""The Responses API over the same generation as chat completions: its request items to the mesh's request, and
the mesh's chunks to its response object or its stream of typed events (what the openai SDK's
`client.responses.create/.stream/.parse` read)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from inference_mesh.v1 import mesh_pb2
from services.gateway.openai_http.convert import CACHE_MODES, FORMATS, ROLES, mesh_extension, priority
from services.gateway.openai_http.schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputMessage,
    NamedFunctionChoice,
    ResponsesRequest,
)

_CHOICES = {None: mesh_pb2.ToolChoice.MODE_AUTO, "auto": mesh_pb2.ToolChoice.MODE_AUTO,
            "none": mesh_pb2.ToolChoice.MODE_NONE, "required": mesh_pb2.ToolChoice.MODE_REQUIRED}


def _messages(body: ResponsesRequest, history: Sequence[mesh_pb2.ChatMessage]) -> list[mesh_pb2.ChatMessage]:
    """This request's turns after the stored conversation it continues (instructions are this request's only)."""
    messages = [mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_SYSTEM, content=body.instructions)] if body.instructions \
        else []
    messages += history
    if isinstance(body.input, str):
        return [*messages, mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=body.input)]
    for item in body.input:
        if isinstance(item, InputMessage):
            messages.append(mesh_pb2.ChatMessage(role=ROLES[item.role], content=item.text()))
        elif isinstance(item, FunctionCallItem):
            call = mesh_pb2.ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)
            if messages and messages[-1].role == mesh_pb2.ROLE_ASSISTANT:
                messages[-1].tool_calls.append(call)   # parallel calls are one assistant turn
            else:
                messages.append(mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_ASSISTANT, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_TOOL, content=item.output,
                                                 tool_call_id=item.call_id))
    return messages


def conversation(body: ResponsesRequest, request: mesh_pb2.GenerateRequest, text: str,
                 last: mesh_pb2.GenerateChunk) -> list[mesh_pb2.ChatMessage]:
    """What a stored response keeps: the turns without this request's instructions, and its answer."""
    turns = list(request.messages[1:] if body.instructions else request.messages)
    answer = mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_ASSISTANT, content=text)
    answer.tool_calls.extend(last.tool_calls)
    return [*turns, answer]


def generate_request(body: ResponsesRequest, max_tokens: int,
                     history: Sequence[mesh_pb2.ChatMessage] = ()) -> mesh_pb2.GenerateRequest:
    request = mesh_pb2.GenerateRequest(model=body.model, messages=_messages(body, history), max_tokens=max_tokens,
                                       request_id=body.request_id, cache_mode=CACHE_MODES[body.cache_mode],
                                       priority=priority(body))
    if body.temperature is not None:
        request.temperature = body.temperature
    if body.top_p is not None:
        request.top_p = body.top_p
    answer_format = body.text.format if body.text is not None else None
    if answer_format is not None and answer_format.type != "text":
        request.response_format.type = FORMATS[answer_format.type]
        if answer_format.type == "json_schema":
            request.response_format.schema = json.dumps(answer_format.schema_ or {}, ensure_ascii=False,
                                                        separators=(",", ":"))
            request.response_format.name = answer_format.name or ""
            request.response_format.strict = bool(answer_format.strict)
    for tool in body.tools or []:
        request.tools.add(name=tool.name, description=tool.description or "", strict=bool(tool.strict),
                          parameters=json.dumps(tool.parameters, ensure_ascii=False, separators=(",", ":"))
                          if tool.parameters is not None else "")
    if isinstance(body.tool_choice, NamedFunctionChoice):
        request.tool_choice.mode = mesh_pb2.ToolChoice.MODE_FUNCTION
        request.tool_choice.function = body.tool_choice.name
    elif body.tools:
        request.tool_choice.mode = _CHOICES[body.tool_choice]
    if body.parallel_tool_calls is not None:
        request.parallel_tool_calls = body.parallel_tool_calls
    return request


class ResponseEnvelope:
    """One response's objects: the response (whole, or as the stream's lifecycle events carry it) and its output
    items. Ids derive from the request id, so a stream's events and its final object agree."""

    def __init__(self, body: ResponsesRequest, response_id: str, stored: bool) -> None:
        self.body = body
        self.id = response_id
        self.message_id = f"msg_{response_id.removeprefix('resp_')}"
        self.stored = stored
        self.created_at = int(time.time())
        self.sequence = 0

    def response(self, status: str, output: list[dict], last: mesh_pb2.GenerateChunk | None = None) -> dict:
        body = self.body
        answer = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": body.model, "output": output, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature, "top_p": body.top_p,
            "previous_response_id": body.previous_response_id, "store": self.stored,
            "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunctionChoice)
            else (body.tool_choice or "auto"),
            "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools or []],
            "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)
                     if body.text is not None and body.text.format is not None else {"type": "text"}},
            "usage": None, "metadata": body.metadata or {},
        }
        if last is not None:
            if last.finish_reason == mesh_pb2.FINISH_REASON_LENGTH:
                answer["status"], answer["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
            answer["usage"] = {"input_tokens": last.usage.prompt_tokens, "output_tokens": last.usage.completion_tokens,
                               "total_tokens": last.usage.total_tokens,
                               "input_tokens_details": {"cached_tokens": 0},
                               "output_tokens_details": {"reasoning_tokens": 0}}
            answer["model"] = last.metadata.model or body.model
            answer["mesh"] = mesh_extension(last.metadata)
        return answer

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [] if status == "in_progress" else [_text_part(text)]}

    @staticmethod
    def call(call: mesh_pb2.ToolCall, status: str = "completed") -> dict:
        return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
                "name": call.name, "arguments": "" if status == "in_progress" else call.arguments, "status": status}

    def output(self, text: str, last: mesh_pb2.GenerateChunk) -> list[dict]:
        if last.tool_calls:
            return [self.call(call) for call in last.tool_calls]
        return [self.message(text)]

    def whole(self, text: str, last: mesh_pb2.GenerateChunk) -> dict:
        return self.response("completed", self.output(text, last), last)

    def event(self, kind: str, **fields: object) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    async def events(self, chunks: AsyncIterator[mesh_pb2.GenerateChunk],
                     finished: Callable[[str, mesh_pb2.GenerateChunk, dict], Awaitable[None]]) -> AsyncIterator[dict]:
        """The stream's events, in the order the SDK's accumulator expects: lifecycle, then per output item added,
        its content or arguments, done; completed last, after `finished` (which stores the response) returned."""
        yield self.event("response.created", response=self.response("in_progress", []))
        yield self.event("response.in_progress", response=self.response("in_progress", []))
        texts: list[str] = []
        opened = False
        async for chunk in chunks:
            if chunk.text:
                if not opened:
                    opened = True
                    yield self.event("response.output_item.added", output_index=0,
                                     item=self.message("", "in_progress"))
                    yield self.event("response.content_part.added", item_id=self.message_id, output_index=0,
                                     content_index=0, part=_text_part(""))
                texts.append(chunk.text)
                yield self.event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                 content_index=0, delta=chunk.text, logprobs=[])
            if not chunk.finish_reason:
                continue
            text = "".join(texts)
            if opened:
                yield self.event("response.output_text.done", item_id=self.message_id, output_index=0,
                                 content_index=0, text=text, logprobs=[])
                yield self.event("response.content_part.done", item_id=self.message_id, output_index=0,
                                 content_index=0, part=_text_part(text))
                yield self.event("response.output_item.done", output_index=0, item=self.message(text))
            for index, call in enumerate(chunk.tool_calls):
                item = self.call(call)
                yield self.event("response.output_item.added", output_index=index,
                                 item=self.call(call, "in_progress"))
                yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=call.arguments)
                yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 arguments=call.arguments, name=call.name)
                yield self.event("response.output_item.done", output_index=index, item=item)
            final = self.response("completed", self.output(text, chunk), chunk)
            await finished(text, chunk, final)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield self.event(kind, response=final)
            return


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

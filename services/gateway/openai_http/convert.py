"""OpenAI request bodies to the mesh's requests, and the mesh's chunks and vectors to OpenAI's responses."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence

import numpy as np
from google.protobuf import json_format

from inference_mesh.v1 import mesh_pb2, retrieval_pb2
from services.gateway.openai_http.errors import invalid_body
from services.gateway.openai_http.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Message,
    NamedToolChoice,
    ResponsesRequest,
    _Sampling,
)

# "developer" is OpenAI's newer name for the system role.
ROLES = {"system": mesh_pb2.ROLE_SYSTEM, "developer": mesh_pb2.ROLE_SYSTEM, "user": mesh_pb2.ROLE_USER,
          "assistant": mesh_pb2.ROLE_ASSISTANT, "tool": mesh_pb2.ROLE_TOOL}
_TOOL_CHOICES = {None: mesh_pb2.ToolChoice.MODE_AUTO, "auto": mesh_pb2.ToolChoice.MODE_AUTO,
                 "none": mesh_pb2.ToolChoice.MODE_NONE, "required": mesh_pb2.ToolChoice.MODE_REQUIRED}
CACHE_MODES = {"default": mesh_pb2.CACHE_MODE_DEFAULT, "bypass": mesh_pb2.CACHE_MODE_BYPASS,
                "refresh": mesh_pb2.CACHE_MODE_REFRESH}
_QUALITY = {"default": mesh_pb2.QUALITY_TIER_DEFAULT, "high": mesh_pb2.QUALITY_TIER_HIGH}
_FINISH = {mesh_pb2.FINISH_REASON_STOP: "stop", mesh_pb2.FINISH_REASON_LENGTH: "length",
           mesh_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}
CACHE_STATUS = {mesh_pb2.CACHE_STATUS_UNSPECIFIED: "", mesh_pb2.CACHE_STATUS_MISS: "miss",
                mesh_pb2.CACHE_STATUS_BYPASS: "bypass", mesh_pb2.CACHE_STATUS_EXACT_HIT: "exact-hit",
                mesh_pb2.CACHE_STATUS_SEMANTIC_HIT: "semantic-hit",
                mesh_pb2.CACHE_STATUS_UNAVAILABLE: "unavailable", mesh_pb2.CACHE_STATUS_DISABLED: "disabled"}


def _sampled(body: _Sampling, messages: Sequence[mesh_pb2.ChatMessage], max_tokens: int) -> mesh_pb2.GenerateRequest:
    request = mesh_pb2.GenerateRequest(
        model=body.model, messages=messages, max_tokens=max_tokens, stop=body.stops(),
        request_id=body.request_id, cache_mode=CACHE_MODES[body.cache_mode],
        no_semantic_cache=body.no_semantic_cache, session_id=body.session_id, quality=_QUALITY[body.quality],
        priority=priority(body))
    if body.temperature is not None:
        request.temperature = body.temperature
    if body.top_p is not None:
        request.top_p = body.top_p
    if body.seed is not None:
        request.seed = body.seed
    return request


def priority(body: _Sampling | ResponsesRequest) -> mesh_pb2.Priority.ValueType:
    return mesh_pb2.PRIORITY_BATCH if body.service_tier == "flex" else mesh_pb2.PRIORITY_INTERACTIVE


FORMATS = {"text": mesh_pb2.ResponseFormat.TYPE_TEXT, "json_object": mesh_pb2.ResponseFormat.TYPE_JSON_OBJECT,
            "json_schema": mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA}


def _message(message: Message) -> mesh_pb2.ChatMessage:
    return mesh_pb2.ChatMessage(
        role=ROLES[message.role], content=message.text(), tool_call_id=message.tool_call_id or "",
        tool_calls=[mesh_pb2.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                    for c in message.tool_calls or []])


def _with_tools(body: ChatCompletionRequest, request: mesh_pb2.GenerateRequest) -> None:
    for tool in body.tools or []:
        function = tool.function
        request.tools.add(name=function.name, description=function.description or "", strict=bool(function.strict),
                          parameters=json.dumps(function.parameters, ensure_ascii=False, separators=(",", ":"))
                          if function.parameters is not None else "")
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        request.tool_choice.mode = mesh_pb2.ToolChoice.MODE_FUNCTION
        request.tool_choice.function = choice.function.name
    elif body.tools:
        request.tool_choice.mode = _TOOL_CHOICES[choice]
    elif choice not in (None, "none"):
        raise invalid_body("tool_choice needs tools", "tool_choice")
    if body.parallel_tool_calls is not None:
        request.parallel_tool_calls = body.parallel_tool_calls


def chat_request(body: ChatCompletionRequest, max_tokens: int) -> mesh_pb2.GenerateRequest:
    request = _sampled(body, [_message(m) for m in body.messages], max_tokens)
    _with_tools(body, request)
    if body.response_format is not None and body.response_format.type != "text":
        answer_format = request.response_format
        answer_format.type = FORMATS[body.response_format.type]
        if (spec := body.response_format.json_schema) is not None:
            # The caller's key order kept: it is the order the answer's keys are written in.
            answer_format.schema = json.dumps(spec.schema_ if spec.schema_ is not None else {},
                                              ensure_ascii=False, separators=(",", ":"))
            answer_format.name = spec.name
            answer_format.strict = bool(spec.strict)
    return request


def completion_request(body: CompletionRequest, max_tokens: int) -> mesh_pb2.GenerateRequest:
    # The mesh's LLMs are chat models: a prompt is one user turn through the model's chat template.
    return _sampled(body, [mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=body.prompt_text())], max_tokens)


_SEARCH_MODES = {None: retrieval_pb2.SEARCH_MODE_UNSPECIFIED, "dense": retrieval_pb2.SEARCH_MODE_DENSE,
                 "sparse": retrieval_pb2.SEARCH_MODE_SPARSE, "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID}


def ask_request(body: ChatCompletionRequest, max_tokens: int) -> mesh_pb2.AskRequest:
    """A chat completion with `retrieval`: one user message, the question the caller's documents answer."""
    if len(body.messages) != 1 or body.messages[0].role != "user":
        raise invalid_body("with retrieval, send exactly one message, the user's question", "messages")
    retrieval = body.retrieval
    if (body.stop or body.top_p is not None or body.session_id or body.cache_mode != "default"
            or (body.response_format is not None and body.response_format.type != "text") or body.tools):
        raise invalid_body("with retrieval, only model, messages, max_tokens, temperature, seed and retrieval apply")
    request = mesh_pb2.AskRequest(model=body.model, question=body.messages[0].text(), max_tokens=max_tokens,
                                  top_k=retrieval.top_k or 0, filter=retrieval.filter, request_id=body.request_id,
                                  priority=priority(body), mode=_SEARCH_MODES[retrieval.mode])
    if retrieval.where is not None:
        try:
            json_format.ParseDict(retrieval.where, request.where)
        except json_format.ParseError as exc:
            raise invalid_body(f"retrieval.where is not a metadata filter: {exc}", "retrieval.where") from exc
    if body.temperature is not None:
        request.temperature = body.temperature
    if body.seed is not None:
        request.seed = body.seed
    return request


def finish_reason(chunk: mesh_pb2.GenerateChunk) -> str | None:
    return _FINISH.get(chunk.finish_reason)


def usage(chunk: mesh_pb2.GenerateChunk) -> dict:
    return {"prompt_tokens": chunk.usage.prompt_tokens, "completion_tokens": chunk.usage.completion_tokens,
            "total_tokens": chunk.usage.total_tokens}


def mesh_extension(metadata: mesh_pb2.ResponseMetadata) -> dict:
    """The mesh's metadata (request id, version, pool, replica, cache, degradations) under `mesh`."""
    return json_format.MessageToDict(metadata, preserving_proto_field_name=True)


def citations(metadata: mesh_pb2.ResponseMetadata) -> list[dict]:
    return [json_format.MessageToDict(c, preserving_proto_field_name=True) for c in metadata.citations]


class Envelope:
    """The response objects of one generation, whole or streamed; the chat and completion shapes differ only in
    how a choice holds its text."""

    whole_object = ""
    chunk_object = ""
    prefix = ""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = f"{self.prefix}-{request_id}"
        self.created = int(time.time())
        self.model = model

    def _choice(self, text: str | None, last: mesh_pb2.GenerateChunk | None, whole: bool) -> dict:
        raise NotImplementedError

    def _base(self, kind: str, model: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": model}

    def whole(self, text: str, last: mesh_pb2.GenerateChunk) -> dict:
        answer = {**self._base(self.whole_object, last.metadata.model or self.model),
                  "system_fingerprint": last.metadata.model_version or None,
                  "choices": [self._choice(text, last, whole=True)],
                  "usage": usage(last), "mesh": mesh_extension(last.metadata)}
        if last.metadata.citations:
            answer["citations"] = citations(last.metadata)
        return answer

    def opening(self) -> dict | None:
        """A chunk before any text (chat streams name the role first), or None."""
        return None

    def tool_call_deltas(self, last: mesh_pb2.GenerateChunk) -> list[dict]:
        return []

    def delta(self, text: str) -> dict:
        return {**self._base(self.chunk_object, self.model), "choices": [self._choice(text, None, whole=False)]}

    def finish(self, last: mesh_pb2.GenerateChunk) -> dict:
        """The chunk that finishes the choice, with the citations of an answer from documents."""
        chunk = {**self._base(self.chunk_object, self.model), "choices": [self._choice(None, last, whole=False)]}
        if last.metadata.citations:
            chunk["citations"] = citations(last.metadata)
        return chunk

    def usage_chunk(self, last: mesh_pb2.GenerateChunk) -> dict:
        """The extra last chunk of stream_options.include_usage (no choices), with the mesh's metadata."""
        return {**self._base(self.chunk_object, self.model), "choices": [], "usage": usage(last),
                "mesh": mesh_extension(last.metadata)}


def _tool_call(call: mesh_pb2.ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ChatEnvelope(Envelope):
    whole_object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _choice(self, text: str | None, last: mesh_pb2.GenerateChunk | None, whole: bool) -> dict:
        finish = finish_reason(last) if last is not None else None
        if whole:
            message: dict = {"role": "assistant", "content": text, "refusal": None}
            if last is not None and last.tool_calls:
                message["content"] = None
                message["tool_calls"] = [_tool_call(call) for call in last.tool_calls]
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}

    def tool_call_deltas(self, last: mesh_pb2.GenerateChunk) -> list[dict]:
        """Each call as OpenAI streams one: a chunk with its index, id, type and name, then its arguments."""
        chunks = []
        for index, call in enumerate(last.tool_calls):
            opening = {"index": index, "id": call.id, "type": "function",
                       "function": {"name": call.name, "arguments": ""}}
            for delta in (opening, {"index": index, "function": {"arguments": call.arguments}}):
                chunks.append({**self._base(self.chunk_object, self.model), "choices": [
                    {"index": 0, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}]})
        return chunks

    def opening(self) -> dict:
        return {**self._base(self.chunk_object, self.model), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}


class CompletionEnvelope(Envelope):
    whole_object, chunk_object, prefix = "text_completion", "text_completion", "cmpl"

    def _choice(self, text: str | None, last: mesh_pb2.GenerateChunk | None, whole: bool) -> dict:
        return {"index": 0, "text": text or "", "logprobs": None,
                "finish_reason": finish_reason(last) if last is not None else None}


def embed_request(body: EmbeddingRequest) -> mesh_pb2.EmbedRequest:
    return mesh_pb2.EmbedRequest(model=body.model, texts=body.texts(), request_id=body.request_id,
                                 cache_mode=CACHE_MODES[body.cache_mode])


def check_dimensions(body: EmbeddingRequest, dimension: int) -> None:
    if body.dimensions is not None and body.dimensions != dimension:
        raise invalid_body(f"{body.model} gives {dimension}-dimensional vectors; dimensions {body.dimensions} "
                           "cannot be served (omit it)", "dimensions")


def embeddings(body: EmbeddingRequest, response: mesh_pb2.EmbedResponse) -> dict:
    data = []
    for index, vector in enumerate(response.embeddings):
        if body.encoding_format == "base64":
            value: list[float] | str = base64.b64encode(np.asarray(vector.values, dtype="<f4").tobytes()).decode()
        else:
            value = list(vector.values)
        data.append({"object": "embedding", "index": index, "embedding": value})
    # No token counts: the embedding models report none, and a guess would be a wrong number.
    return {"object": "list", "data": data, "model": response.metadata.model or body.model,
            "mesh": mesh_extension(response.metadata)}


def model_entry(name: str, kind: str, owner: str = "inference-mesh") -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner, "mesh": {"kind": kind}}

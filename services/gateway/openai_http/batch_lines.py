"""One line of a batch, run as the same request would be over HTTP (the same parsing, checks, budget, cache and
answer shape), but at batch priority and never streamed: its answer is the `response` of the output file's line,
its refusal the `body` of the error file's."""

from __future__ import annotations

from dataclasses import dataclass

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.common.errors import MeshError
from services.gateway.auth import Caller
from services.gateway.core import MeshCore
from services.gateway.openai_http import convert
from services.gateway.openai_http.app import collected, parsed_body
from services.gateway.openai_http.errors import OpenAIError, from_mesh_error, invalid_body
from services.gateway.openai_http.schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

# Worth another try later (capacity, a budget's window, a hop away): the line goes back to its queue.
TRANSIENT = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class LineAnswer:
    status_code: int
    body: dict
    request_id: str = ""


async def run_line(core: MeshCore, caller: Caller, endpoint: str, body: str, timeout_s: float) -> LineAnswer:
    try:
        return await _run(core, caller, endpoint, body.encode(), timeout_s)
    except OpenAIError as exc:
        return LineAnswer(exc.kind.status, exc.body())
    except MeshError as exc:
        error = from_mesh_error(exc)
        return LineAnswer(error.kind.status, error.body())


async def _run(core: MeshCore, caller: Caller, endpoint: str, raw: bytes, timeout_s: float) -> LineAnswer:
    if endpoint == "/v1/embeddings":
        embedding: EmbeddingRequest = parsed_body(EmbeddingRequest, raw)
        model = await core.model(caller, embedding.model, models_pb2.MODEL_KIND_EMBED)
        convert.check_dimensions(embedding, model.dimension)
        request = convert.embed_request(embedding)
        request.priority = mesh_pb2.PRIORITY_BATCH
        response = await core.embed(caller, request, timeout_s)
        return LineAnswer(200, convert.embeddings(embedding, response), response.metadata.request_id)
    if endpoint == "/v1/chat/completions":
        chat: ChatCompletionRequest = parsed_body(ChatCompletionRequest, raw)
        _not_streamed(chat.stream)
        if chat.retrieval is not None:
            ask = convert.ask_request(chat, chat.output_limit() or 0)
            ask.priority = mesh_pb2.PRIORITY_BATCH
            generation = await core.ask(caller, ask, timeout_s)
        else:
            generate = convert.chat_request(chat, chat.output_limit() or await core.output_limit(chat.model))
            generate.priority = mesh_pb2.PRIORITY_BATCH
            generation = await core.generate(caller, generate, timeout_s)
        envelope: convert.Envelope = convert.ChatEnvelope(generation.metadata.request_id, chat.model)
    else:
        completion: CompletionRequest = parsed_body(CompletionRequest, raw)
        _not_streamed(completion.stream)
        generate = convert.completion_request(
            completion, completion.output_limit() or await core.output_limit(completion.model))
        generate.priority = mesh_pb2.PRIORITY_BATCH
        generation = await core.generate(caller, generate, timeout_s)
        envelope = convert.CompletionEnvelope(generation.metadata.request_id, completion.model)
    text, last = await collected(generation)
    return LineAnswer(200, envelope.whole(text, last), generation.metadata.request_id)


def _not_streamed(stream: bool | None) -> None:
    if stream:
        raise invalid_body("a batch request is not streamed: its answer goes to the output file; drop \"stream\"",
                           "stream")

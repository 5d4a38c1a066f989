"""Field-by-field validation of public requests, with messages a person can act on."""

from __future__ import annotations

import json

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.common.errors import MeshError, invalid, not_found
from services.gateway.settings import RequestLimits
from services.gateway.structured_output import schema_text
from services.gateway.tools import check_tools


def _model_error(name: str, known: list[models_pb2.ModelInfo], kind: models_pb2.ModelKind.ValueType) -> MeshError:
    names = sorted(m.name for m in known if m.kind == kind)
    if not name:
        return invalid(f"model is required; one of {names}")
    return not_found(f"unknown model {name!r}; available: {names}")


def check_model(name: str, model: models_pb2.ModelInfo | None, known: list[models_pb2.ModelInfo],
                kind: models_pb2.ModelKind.ValueType) -> models_pb2.ModelInfo:
    if model is None or model.kind != kind:
        raise _model_error(name, known, kind)
    return model


def check_request_id(request_id: str, limits: RequestLimits) -> None:
    if len(request_id) > limits.max_request_id_chars:
        raise invalid(f"request_id is {len(request_id)} characters; the limit is {limits.max_request_id_chars}")
    # It travels downstream in a gRPC header, which admits printable ASCII only.
    if request_id and not (request_id.isascii() and request_id.isprintable()):
        raise invalid("request_id must be printable ASCII (letters, digits, punctuation, spaces)")


def check_message(index: int, message: mesh_pb2.ChatMessage) -> None:
    if message.role == mesh_pb2.ROLE_UNSPECIFIED or message.role not in mesh_pb2.Role.values():
        raise invalid(f"messages[{index}].role must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
    if message.tool_calls and message.role != mesh_pb2.ROLE_ASSISTANT:
        raise invalid(f"messages[{index}]: only an assistant message carries tool_calls")
    if (message.role == mesh_pb2.ROLE_TOOL) != bool(message.tool_call_id):
        raise invalid(f"messages[{index}]: a tool message, and only a tool message, names its tool_call_id")
    for call in message.tool_calls:
        try:
            json.loads(call.arguments)
        except json.JSONDecodeError:
            raise invalid(f"messages[{index}]: tool call {call.name!r} has arguments that are not JSON") from None
    if not message.content.strip() and not message.tool_calls:
        raise invalid(f"messages[{index}].content is empty")


def check_generate(request: mesh_pb2.GenerateRequest, model: models_pb2.ModelInfo, limits: RequestLimits) -> None:
    check_request_id(request.request_id, limits)
    # It keys canary stickiness and prefix affinity, travels in a KServe parameter and lives in router memory.
    if len(request.session_id) > limits.max_session_id_chars:
        raise invalid(f"session_id is {len(request.session_id)} characters; the limit is {limits.max_session_id_chars}")
    if not request.messages:
        raise invalid("messages is empty; send at least one message with role USER")
    if len(request.messages) > limits.max_messages:
        raise invalid(f"{len(request.messages)} messages; the limit is {limits.max_messages}")
    for index, message in enumerate(request.messages):
        check_message(index, message)
    prompt_chars = sum(len(m.content) for m in request.messages)
    if prompt_chars > limits.max_prompt_chars:
        raise invalid(f"prompt is {prompt_chars} characters; the limit is {limits.max_prompt_chars}")
    if not 1 <= request.max_tokens <= model.max_output_tokens:
        raise invalid(f"max_tokens must be within 1..{model.max_output_tokens} for {model.name}, "
                      f"got {request.max_tokens}")
    if request.HasField("temperature") and not (0.0 <= request.temperature <= 2.0):
        raise invalid(f"temperature must be within [0, 2], got {request.temperature:g}")
    if request.HasField("top_p") and not (0.0 < request.top_p <= 1.0):
        raise invalid(f"top_p must be within (0, 1], got {request.top_p:g}")
    if len(request.stop) > limits.max_stop_sequences:
        raise invalid(f"{len(request.stop)} stop sequences; the limit is {limits.max_stop_sequences}")
    for index, stop in enumerate(request.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise invalid(f"stop[{index}] must be 1..{limits.max_stop_chars} characters")
    schema_text(request.response_format)
    check_tools(request)


def check_embed(request: mesh_pb2.EmbedRequest, limits: RequestLimits) -> None:
    check_request_id(request.request_id, limits)
    if not request.texts:
        raise invalid(f"texts is empty; send 1 to {limits.max_embed_batch} texts")
    if len(request.texts) > limits.max_embed_batch:
        raise invalid(f"{len(request.texts)} texts; the limit is {limits.max_embed_batch} per call: split the batch")
    for index, text in enumerate(request.texts):
        if not text.strip():
            raise invalid(f"texts[{index}] is empty")
        if len(text) > limits.max_embed_text_chars:
            raise invalid(f"texts[{index}] is {len(text)} characters; the limit is {limits.max_embed_text_chars}")

"""Tool calling: the request's tools checked and turned into what the engine decodes under, and the engine's answer
read back into tool calls.

The engine gets two things (the generation contract's optional inputs): `tools`, the functions and the choice, for
its prompt (each model renders them in its own chat format), and `json_schema`, the shape of a call: an object
{"tool_calls": [{"name": <a tool's name>, "arguments": <that tool's parameters>}, ...]}. The CPU model decodes
the calls under that schema's grammar after a "<tool_call>" marker (with tool_choice auto, the marker or plain
text is the model's first choice), so a call's arguments always validate against its tool's parameters.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator

from inference_mesh.v1 import mesh_pb2
from services.common.errors import MeshError, invalid
from services.gateway.structured_output import check_schema

# What opens a tool call in the engine's answer (triton_models/smollm2/1/contract.py writes it the same way).
CALL_MARKER = "<tool_call>"
MAX_TOOLS = 64
MAX_DESCRIPTION_CHARS = 1_024     # OpenAI's bound on a function's description
MAX_TOOL_CHARS = 32_768           # every tool's description and parameters together
# Calls one answer may hold with parallel_tool_calls: a bound, so a small model cannot repeat calls until
# max_tokens.
MAX_PARALLEL_CALLS = 4
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MODES = {mesh_pb2.ToolChoice.MODE_AUTO: "auto", mesh_pb2.ToolChoice.MODE_REQUIRED: "required",
          mesh_pb2.ToolChoice.MODE_FUNCTION: "required", mesh_pb2.ToolChoice.MODE_NONE: "none"}


def uses_tools(request: mesh_pb2.GenerateRequest) -> bool:
    """The answer may be tool calls (tools given and a choice other than none)."""
    return bool(request.tools) and request.tool_choice.mode != mesh_pb2.ToolChoice.MODE_NONE


def check_tools(request: mesh_pb2.GenerateRequest) -> None:
    choice = request.tool_choice
    if not request.tools:
        if choice.mode in (mesh_pb2.ToolChoice.MODE_REQUIRED, mesh_pb2.ToolChoice.MODE_FUNCTION):
            raise invalid("tool_choice asks for a tool call, but no tools were given")
        return
    if len(request.tools) > MAX_TOOLS:
        raise invalid(f"{len(request.tools)} tools; the limit is {MAX_TOOLS}")
    if request.response_format.type != mesh_pb2.ResponseFormat.TYPE_TEXT:
        raise invalid("send tools or response_format, not both (a final answer in a schema after tool calls "
                      "is not supported yet)")
    names = [tool.name for tool in request.tools]
    described = sum(len(tool.description) + len(tool.parameters) for tool in request.tools)
    if described > MAX_TOOL_CHARS:
        # All of it goes into the prompt, and the parameters into one grammar.
        raise invalid(f"the tools' descriptions and parameters hold {described} characters; the limit is "
                      f"{MAX_TOOL_CHARS}")
    for index, tool in enumerate(request.tools):
        if not _NAME.match(tool.name):
            raise invalid(f"tools[{index}].name must be 1..64 letters, digits, '_' or '-'")
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            raise invalid(f"tools[{index}].description is {len(tool.description)} characters; the limit is "
                          f"{MAX_DESCRIPTION_CHARS}")
        if tool.parameters:
            try:
                if json.loads(tool.parameters).get("type", "object") != "object":
                    raise invalid(f"tools[{index}].parameters must describe an object")
            except (json.JSONDecodeError, AttributeError):
                raise invalid(f"tools[{index}].parameters must be a JSON object") from None
            try:
                check_schema(tool.parameters, tool.strict)
            except MeshError as exc:
                raise invalid(f"tools[{index}] ({tool.name}) parameters: {exc.message}") from None
    if len(set(names)) != len(names):
        raise invalid("tool names must be unique")
    if choice.mode == mesh_pb2.ToolChoice.MODE_FUNCTION and choice.function not in names:
        raise invalid(f"tool_choice names {choice.function!r}, which is not among the tools {names}")


def _hoisted(parameters: dict, prefix: str, defs: dict) -> dict:
    """The tool's parameters with its $defs moved under the call schema's root (refs resolve from the root)."""
    own = {**parameters.pop("$defs", {}), **parameters.pop("definitions", {})}

    def rewrite(node: object) -> object:
        if isinstance(node, dict):
            return {k: (f"#/$defs/{prefix}{v.rsplit('/', 1)[1]}" if k == "$ref" and isinstance(v, str)
                        else rewrite(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    for name, schema in own.items():
        defs[f"{prefix}{name}"] = rewrite(schema)
    return rewrite(parameters)


def calls_schema(request: mesh_pb2.GenerateRequest) -> str:
    """The JSON schema an answer's calls are decoded under (compact JSON text)."""
    choice = request.tool_choice
    chosen = [t for t in request.tools
              if choice.mode != mesh_pb2.ToolChoice.MODE_FUNCTION or t.name == choice.function]
    defs: dict = {}
    branches = []
    for index, tool in enumerate(chosen):
        parameters = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
        branches.append({"type": "object", "properties": {
            "name": {"const": tool.name},
            "arguments": _hoisted(parameters, f"t{index}_", defs)},
            "required": ["name", "arguments"], "additionalProperties": False})
    parallel = choice.mode != mesh_pb2.ToolChoice.MODE_FUNCTION and (
        not request.HasField("parallel_tool_calls") or request.parallel_tool_calls)
    calls = {"type": "array", "items": branches[0] if len(branches) == 1 else {"anyOf": branches},
             "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1}
    schema: dict = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                    "additionalProperties": False}
    if defs:
        schema["$defs"] = defs
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def tools_input(request: mesh_pb2.GenerateRequest) -> str:
    """What the engine's prompt says about the tools, and how it must answer (the `tools` input, JSON text)."""
    return json.dumps({
        "tools": [{"name": t.name, "description": t.description,
                   "parameters": json.loads(t.parameters) if t.parameters else {"type": "object"}}
                  for t in request.tools],
        "choice": _MODES[request.tool_choice.mode],
    }, ensure_ascii=False, separators=(",", ":"))


def read_calls(text: str) -> list[mesh_pb2.ToolCall] | None:
    """The tool calls of an answer that made them, else None (a text answer)."""
    if not text.startswith(CALL_MARKER):
        return None
    try:
        calls = json.loads(text[len(CALL_MARKER):])["tool_calls"]
        return [mesh_pb2.ToolCall(id=f"call_{secrets.token_hex(12)}", name=call["name"],
                                  arguments=json.dumps(call["arguments"], ensure_ascii=False))
                for call in calls]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


async def with_tool_calls(chunks: AsyncIterator[mesh_pb2.GenerateChunk]) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    """Text answers pass through as they stream. An answer that opens with the call marker is held back and
    ends as one last chunk carrying the calls (FINISH_REASON_TOOL_CALLS), with the usage and metadata; one cut
    short (length, cancelled) ends as the text that was written."""
    held = ""
    calling: bool | None = None  # None: the answer's first characters may still be the marker
    try:
        async for chunk in chunks:
            if calling is False:
                yield chunk
                continue
            held += chunk.text
            if calling is None:
                if CALL_MARKER.startswith(held) and not chunk.finish_reason:
                    continue
                calling = held.startswith(CALL_MARKER)
                if not calling:
                    chunk.text = held
                    yield chunk
                    continue
            if chunk.finish_reason:
                calls = read_calls(held) if chunk.finish_reason == mesh_pb2.FINISH_REASON_STOP else None
                if calls:
                    chunk.tool_calls.extend(calls)
                    chunk.text = ""
                    chunk.finish_reason = mesh_pb2.FINISH_REASON_TOOL_CALLS
                else:
                    chunk.text = held
                yield chunk
                return
    finally:
        await chunks.aclose()

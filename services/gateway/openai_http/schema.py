"""The request bodies the OpenAI API takes, parsed strictly: a field the mesh would silently ignore in a way that
changes the answer (n > 1, tools, logprobs, penalties) is refused with a message rather than dropped. Fields that
only describe the caller (user, metadata) are accepted. The mesh's own options are extra body fields
(`extra_body=` in the openai SDK), named in MeshOptions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr   # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or text parts (images and audio are refused by the Literal above).
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    refusal: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None    # assistant: the calls it made
    tool_call_id: StrictStr | None = None       # tool: the call this result answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None


# The ranges of the proto fields these become: past them, building the request would raise (a 500), so the body
# is refused as a 400 naming the field. The mesh's own, tighter limits are checked after (validation.py).
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_Count = Annotated[int, Field(strict=True, ge=1, le=_UINT32_MAX)]
_Seed = Annotated[int, Field(strict=True, ge=0, le=_UINT64_MAX)]


class Retrieval(_Body):
    """Mesh extension: answer from the caller's documents (the Ask RPC), citing the chunks used."""

    top_k: _Count | None = None
    filter: StrictStr = ""
    where: dict[str, Any] | None = None
    mode: Literal["dense", "sparse", "hybrid"] | None = None   # SearchMode; default hybrid


_Number = Annotated[float, Field(strict=False)]


class _Sampling(_Body):
    """Fields shared by chat completions and completions, and the mesh's extensions."""

    model: StrictStr
    max_tokens: _Count | None = None
    temperature: _Number | None = None
    top_p: _Number | None = None
    seed: _Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    # Accepted as OpenAI defines them only at their neutral value: anything else would be ignored.
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logprobs: Literal[False] | None = None
    user: StrictStr | None = None
    # OpenAI's processing tier: "flex" (slower, cheaper) is the mesh's batch priority under overload; the others
    # are interactive.
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    # Mesh extensions (documented in docs/openai-api.md).
    cache_mode: Literal["default", "bypass", "refresh"] = "default"
    no_semantic_cache: StrictBool = False
    session_id: StrictStr = ""
    quality: Literal["default", "high"] = "default"
    request_id: StrictStr = ""

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class JsonSchemaFormat(_Body):
    name: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    # Any JSON object here; what the decoder enforces is checked by services/gateway/structured_output.py.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


class FunctionDefinition(_Body):
    name: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = False


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: _Count | None = None
    top_logprobs: Literal[0] | None = None
    metadata: dict[str, StrictStr] | None = None
    store: Literal[False] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    retrieval: Retrieval | None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class WrongHitReport(ChatCompletionRequest):
    """Mesh extension: the chat completion body that got a wrong semantic-cache answer, as it was sent, and
    the entry that answered (`mesh.cache_entry` of that response)."""

    cache_entry: StrictStr


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt (a string, or a list of one string); batches are not supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def output_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Body):
    model: StrictStr
    # Text only: token arrays belong to OpenAI's tokenizer, not to the mesh's embedding models.
    input: StrictStr | list[StrictStr]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: _Count | None = None
    user: StrictStr | None = None
    cache_mode: Literal["default", "bypass", "refresh"] = "default"
    request_id: StrictStr = ""

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# The Responses API (POST /v1/responses): the same generation, OpenAI's newer request and answer shapes.
class InputText(_Body):
    type: Literal["input_text", "output_text"]
    text: StrictStr
    annotations: list[Any] | None = None


class InputMessage(_Body):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[InputText]
    id: StrictStr | None = None
    status: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionTool(_Body):
    type: Literal["function"]
    name: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunctionChoice(_Body):
    type: Literal["function"]
    name: StrictStr


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    @model_validator(mode="after")
    def _named_schema(self) -> TextFormat:
        if (self.type == "json_schema") != (self.name is not None):
            raise ValueError("a json_schema format has a name, and only it")
        return self


class TextOptions(_Body):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponsesRequest(_Body):
    model: StrictStr
    input: StrictStr | list[InputMessage | FunctionCallItem | FunctionCallOutputItem]
    instructions: StrictStr | None = None
    max_output_tokens: _Count | None = None
    temperature: _Number | None = None
    top_p: _Number | None = None
    stream: StrictBool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextOptions | None = None
    # Responses are not stored (yet): store true and previous_response_id are refused with what to do instead.
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    truncation: Literal["disabled"] | None = None
    # Mesh extensions, as on chat completions.
    cache_mode: Literal["default", "bypass", "refresh"] = "default"
    request_id: StrictStr = ""


class CreateBatchRequest(_Body):
    """POST /v1/batches (services/gateway/batches)."""

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    # OpenAI's bounds: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[StrictStr, StrictStr] | None = Field(None, max_length=16)

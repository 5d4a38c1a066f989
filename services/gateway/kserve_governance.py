"""The KServe endpoint governed like the mesh API: requests checked, token budgets admitted and charged, and
the work one stream may have outstanding at the router bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor

from services.common.errors import MeshError, invalid
from services.common.kserve import RESUME_INPUT, SCHEMA_INPUT, is_final_response, output_arrays
from services.gateway.settings import KServeLimits
from services.gateway.structured_output import check_schema

# The usage tensors of the mesh's LLM contract (triton_models/smollm2, the TensorRT-LLM BLS model).
_USAGE = ("prompt_tokens", "completion_tokens")


def check_infer_request(request: service_pb2.ModelInferRequest, limits: KServeLimits) -> None:
    if not request.model_name or len(request.model_name) > limits.max_name_chars:
        raise invalid(f"model_name must be 1..{limits.max_name_chars} characters")
    if len(request.id) > limits.max_name_chars:
        raise invalid(f"id is {len(request.id)} characters; the limit is {limits.max_name_chars}")
    if not request.inputs or len(request.inputs) > limits.max_inputs:
        raise invalid(f"send 1..{limits.max_inputs} inputs, got {len(request.inputs)}")
    if len(request.parameters) > limits.max_parameters:
        raise invalid(f"{len(request.parameters)} parameters; the limit is {limits.max_parameters}")
    for name, parameter in request.parameters.items():
        if len(name) > limits.max_name_chars or len(parameter.string_param) > limits.max_parameter_chars:
            raise invalid(f"parameter {name[:40]!r} is too long: names up to {limits.max_name_chars} characters, "
                          f"string values up to {limits.max_parameter_chars}")
    size = sum(len(raw) for raw in request.raw_input_contents) + request.ByteSize() * (not request.raw_input_contents)
    if size > limits.max_request_bytes:
        raise invalid(f"the inputs hold {size} bytes; the limit is {limits.max_request_bytes}")
    for index, tensor in enumerate(request.inputs):
        if tensor.name == SCHEMA_INPUT:
            _check_schema_input(request, index)
        if tensor.name == RESUME_INPUT:
            # Token ids go into the model's context as they are: a caller's could hold control tokens (a turn of
            # its own) or ids the text never had. Only the router resumes a stream, with the ids it relayed.
            raise invalid(f"input {RESUME_INPUT!r} is the mesh's own (the router resumes streams with it); "
                          "send the conversation as messages")
        if any(d < 0 for d in tensor.shape) or int(np.prod(tensor.shape, dtype=np.int64)) > limits.max_elements:
            raise invalid(f"input {tensor.name!r} has shape {list(tensor.shape)}; at most "
                          f"{limits.max_elements} elements")


def _check_schema_input(request: service_pb2.ModelInferRequest, index: int) -> None:
    """A KServe caller's schema is held to what the decoder enforces, as a mesh API caller's response_format is."""
    tensor = request.inputs[index]
    if request.raw_input_contents:
        if index >= len(request.raw_input_contents):
            raise invalid(f"input {SCHEMA_INPUT!r} has no contents")
        values = list(deserialize_bytes_tensor(request.raw_input_contents[index]).reshape(-1))
    else:
        values = list(tensor.contents.bytes_contents)
    if len(values) != 1:
        raise invalid(f"input {SCHEMA_INPUT!r} takes one schema (JSON text), got {len(values)}")
    try:
        text = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"input {SCHEMA_INPUT!r} must be UTF-8 JSON text") from None
    check_schema(text)


def token_counts(response: service_pb2.ModelInferResponse) -> tuple[int, ...] | None:
    """The usage outputs a response reports, in _USAGE's order (0 where one is missing), if it reports any."""
    if not any(output.name in _USAGE for output in response.outputs):
        return None
    try:
        arrays = output_arrays(response)
    except ValueError:
        return None
    return tuple(int(arrays[name].reshape(-1)[0]) if name in arrays and arrays[name].size else 0
                 for name in _USAGE)


def tokens_used(response: service_pb2.ModelInferResponse) -> int | None:
    """Prompt + completion tokens a response reports (the model counts them across the stream), if it does."""
    counts = token_counts(response)
    return None if counts is None else sum(counts)


class StreamWindow:
    """At most `limit` requests of one stream outstanding at the router: the next is read from the caller only
    when an earlier one has had its final response. Each request is checked, then admitted (`admit` raises
    MeshError to refuse it), on the way; a refusal ends the stream after what was sent is answered."""

    def __init__(self, limit: int, limits: KServeLimits,
                 admit: Callable[[service_pb2.ModelInferRequest], Awaitable[None]] | None = None) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._limits = limits
        self._admit = admit
        self.refused: MeshError | None = None

    async def requests(self, incoming: AsyncIterator[service_pb2.ModelInferRequest]
                       ) -> AsyncIterator[service_pb2.ModelInferRequest]:
        async for request in incoming:
            await self._slots.acquire()
            try:
                check_infer_request(request, self._limits)
                if self._admit is not None:
                    await self._admit(request)
            except MeshError as exc:
                self.refused = exc
                return
            yield request

    def answered(self, response: service_pb2.ModelStreamInferResponse) -> bool:
        """Whether this response ended its request (which frees a place in the window)."""
        if response.error_message or is_final_response(response.infer_response):
            self._slots.release()
            return True
        return False

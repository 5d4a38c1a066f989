"""Building and reading KServe v2 tensors (tritonclient's generated messages, raw contents)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

# The input a resumable generation model takes the token ids already delivered in (triton_models/smollm2). Only
# the router sets it, to continue a stream on another replica; the gateway refuses it from callers.
RESUME_INPUT = "resume_tokens"
# The optional input a generation decodes under a JSON schema with (JSON text). The router sends a request carrying
# it only to placements that declare structured_output.
SCHEMA_INPUT = "json_schema"
# The optional input naming the tools a generation may call and the caller's choice (JSON text); only placements
# that declare `tools` get it.
TOOLS_INPUT = "tools"

_NP_TO_TRITON = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint64): "UINT64",
}


def encode_bytes(values: Sequence[bytes]) -> bytes:
    """Triton's BYTES wire format: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


class InferRequestBuilder:
    def __init__(self, model: str, request_id: str = "", version: str = "") -> None:
        self.request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)

    def add_bytes(self, name: str, values: Sequence[bytes], shape: Sequence[int] | None = None) -> InferRequestBuilder:
        tensor = self.request.inputs.add(name=name, datatype="BYTES")
        tensor.shape.extend(shape if shape is not None else [len(values)])
        self.request.raw_input_contents.append(encode_bytes(values))
        return self

    def add_array(self, name: str, array: np.ndarray) -> InferRequestBuilder:
        tensor = self.request.inputs.add(name=name, datatype=_NP_TO_TRITON[array.dtype])
        tensor.shape.extend(array.shape)
        self.request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        return self

    def build(self) -> service_pb2.ModelInferRequest:
        return self.request


def output_arrays(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs by name; BYTES outputs become object arrays of bytes."""
    arrays: dict[str, np.ndarray] = {}
    for index, output in enumerate(response.outputs):
        shape = list(output.shape)
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""
        if output.datatype == "BYTES":
            values = deserialize_bytes_tensor(raw) if raw else np.array(output.contents.bytes_contents, dtype=object)
            arrays[output.name] = np.asarray(values, dtype=object).reshape(shape)
        else:
            arrays[output.name] = np.frombuffer(raw, dtype=triton_to_np_dtype(output.datatype)).reshape(shape)
    return arrays


def raw_outputs(response: service_pb2.ModelInferResponse) -> dict[str, tuple[str, bytes]]:
    """Outputs by name as (datatype, raw bytes), unparsed: a hop on the token path reads a few scalars per
    response, and building numpy arrays for them was ~13% of the gateway's samples in a py-spy profile."""
    raw = response.raw_output_contents
    return {output.name: (output.datatype, raw[index] if index < len(raw) else b"")
            for index, output in enumerate(response.outputs)}


def first_bytes(raw: bytes) -> bytes:
    """The first element of a raw BYTES tensor (b"" when there is none)."""
    if len(raw) < 4:
        return b""
    (length,) = struct.unpack_from("<I", raw)
    return raw[4:4 + length]


def only_bytes(raw: bytes) -> bytes | None:
    """The element of a raw BYTES tensor that holds exactly one; None for any other shape of contents."""
    if len(raw) < 4:
        return None
    (length,) = struct.unpack_from("<I", raw)
    return raw[4:] if length == len(raw) - 4 else None


def first_int(datatype: str, raw: bytes) -> int:
    """The first element of a raw INT32/INT64 tensor."""
    return struct.unpack_from("<i" if datatype == "INT32" else "<q", raw)[0]


def string_parameter(response: service_pb2.ModelInferResponse, name: str) -> str:
    param = response.parameters.get(name)
    return param.string_param if param is not None else ""


def int_parameter(response: service_pb2.ModelInferResponse, name: str) -> int:
    param = response.parameters.get(name)
    return param.int64_param if param is not None else 0


def used_tokens(response: service_pb2.ModelInferResponse) -> int:
    """Prompt + completion tokens from a generation's last response; 0 when the model does not report them."""
    try:
        outputs = output_arrays(response)
        return int(outputs["prompt_tokens"].reshape(-1)[0] + outputs["completion_tokens"].reshape(-1)[0])
    except (KeyError, IndexError, ValueError):
        return 0


def is_final_response(response: service_pb2.ModelInferResponse) -> bool:
    param = response.parameters.get("triton_final_response")
    return bool(param is not None and param.bool_param)


async def read_to_end(stream: AsyncIterator, timeout_s: float = 1.0) -> None:
    """After the final response, let the call end on its own (the server closes it at once) instead of cancelling
    it, so that client interceptors see its end: a tracing span left open is never exported."""
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, StopAsyncIteration):
        async with asyncio.timeout(timeout_s):
            async for _ in stream:
                pass

"""Generate: public request → KServe stream request (placed by the router) → public chunks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import mesh_pb2
from services.common.errors import from_stream_error, unavailable
from services.common.kserve import (
    SCHEMA_INPUT,
    TOOLS_INPUT,
    InferRequestBuilder,
    first_bytes,
    first_int,
    is_final_response,
    raw_outputs,
    read_to_end,
)
from services.common.retries import Retrier
from services.common.wire import AFFINITY_PARAMETER, RETRY_AFTER_PARAMETER, SESSION_PARAMETER
from services.gateway.errors import from_rpc_error
from services.gateway.plan import Delivered, RequestPlan
from services.gateway.served_by import record_placement
from services.gateway.structured_output import schema_text
from services.gateway.tools import calls_schema, tools_input, uses_tools

_ROLE_NAMES = {mesh_pb2.ROLE_SYSTEM: "system", mesh_pb2.ROLE_USER: "user", mesh_pb2.ROLE_ASSISTANT: "assistant",
               mesh_pb2.ROLE_TOOL: "tool"}
_FINISH = {
    "stop": mesh_pb2.FINISH_REASON_STOP,
    "length": mesh_pb2.FINISH_REASON_LENGTH,
    "cancelled": mesh_pb2.FINISH_REASON_CANCELLED,
}


def _message(message: mesh_pb2.ChatMessage) -> dict:
    rendered: dict = {"role": _ROLE_NAMES[message.role], "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in message.tool_calls]
    return rendered


def to_kserve(request: mesh_pb2.GenerateRequest, request_id: str, version: str = "",
              affinity: str = "") -> service_pb2.ModelInferRequest:
    messages = [_message(m) for m in request.messages]
    builder = InferRequestBuilder(request.model, request_id, version)
    builder.add_bytes("messages", [json.dumps(messages, ensure_ascii=False).encode("utf-8")])
    builder.add_array("max_tokens", np.array([request.max_tokens], dtype=np.int32))
    if request.HasField("temperature"):
        builder.add_array("temperature", np.array([request.temperature], dtype=np.float32))
    if request.HasField("top_p"):
        builder.add_array("top_p", np.array([request.top_p], dtype=np.float32))
    if request.HasField("seed"):
        builder.add_array("seed", np.array([request.seed & 0x7FFF_FFFF_FFFF_FFFF], dtype=np.int64))
    if request.stop:
        builder.add_bytes("stop", [s.encode("utf-8") for s in request.stop])
    schema = calls_schema(request) if uses_tools(request) else schema_text(request.response_format)
    if schema is not None:
        builder.add_bytes(SCHEMA_INPUT, [schema.encode("utf-8")])
    if request.tools:
        builder.add_bytes(TOOLS_INPUT, [tools_input(request).encode("utf-8")])
    built = builder.build()
    if request.session_id:
        built.parameters[SESSION_PARAMETER].string_param = request.session_id
    if affinity:
        built.parameters[AFFINITY_PARAMETER].string_param = affinity
    return built


class GenerationStreams(Protocol):
    """Where a generation's KServe responses come from: yields the stream's responses, its final one last (an
    error in the stream raised as a MeshError)."""

    def responses(self, request: service_pb2.ModelInferRequest, plan: RequestPlan,
                  ) -> AsyncIterator[service_pb2.ModelInferResponse]: ...


class RouterRelayed:
    """The stream relayed by the router (its KServe ModelStreamInfer): for networks where gateways may not reach
    the engines. A router that cannot be reached (UNAVAILABLE before any response) is tried again with backoff,
    within the deadline and the retry budget; once text has been sent only the router can continue the stream."""

    def __init__(self, router: service_pb2_grpc.GRPCInferenceServiceStub, retrier: Retrier | None = None) -> None:
        self._router = router
        self._retrier = retrier

    async def responses(self, request: service_pb2.ModelInferRequest,
                        plan: RequestPlan) -> AsyncIterator[service_pb2.ModelInferResponse]:
        retrier = self._retrier
        deadline = time.monotonic() + plan.timeout_s
        if retrier is not None:
            retrier.budget.on_request()
        retry = 0
        while True:
            call = None
            started = False
            try:
                # Inside the try: an open breaker refuses the call right here, with UNAVAILABLE.
                call = self._router.ModelStreamInfer(iter([request]), timeout=max(deadline - time.monotonic(), 0.001),
                                                     metadata=plan.headers)
                stream = aiter(call)
                async for item in stream:
                    started = True
                    if item.error_message:
                        hint = item.infer_response.parameters.get(RETRY_AFTER_PARAMETER)
                        raise from_stream_error(item.error_message, hint.double_param if hint is not None else 0.0)
                    if is_final_response(item.infer_response):
                        # Before the last response is handed on: a consumer that stops at it (the HTTP API's
                        # non-streamed answer) closes this generator there, and the call's tracing span would then
                        # end only when the garbage collector gets to it (found missing from traces).
                        await read_to_end(stream)
                        yield item.infer_response
                        return
                    yield item.infer_response
                raise unavailable("router: the stream ended before the last token")
            except grpc.aio.AioRpcError as exc:
                pause = retrier.backoff_s(retry) if retrier is not None else 0.0
                if (not started and retrier is not None and deadline - time.monotonic() > pause + 0.05
                        and retrier.may_retry(retry, exc.code())):
                    retry += 1
                    await asyncio.sleep(pause)
                    continue
                raise from_rpc_error(exc, "router") from exc
            finally:
                # Cancels the router stream (and so the Triton request) when our caller goes away.
                if call is not None:
                    call.cancel()


async def stream_generation(
    streams: GenerationStreams,
    request: mesh_pb2.GenerateRequest,
    plan: RequestPlan,
) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    """Yields one chunk per non-empty text delta and a last chunk with finish reason, usage and metadata."""
    metadata = plan.metadata
    kserve_request = to_kserve(request, metadata.request_id, plan.model.version, plan.affinity)
    async for response in streams.responses(kserve_request, plan):
        chunk = _chunk(response, metadata, plan.delivered)
        if chunk is not None:
            yield chunk
            if chunk.finish_reason:
                return


def _chunk(response: service_pb2.ModelInferResponse, metadata: mesh_pb2.ResponseMetadata,
           delivered: Delivered) -> mesh_pb2.GenerateChunk | None:
    """A text delta (None when empty), or the last chunk with finish reason, usage and metadata."""
    outputs = raw_outputs(response)
    text = first_bytes(outputs["text_output"][1]).decode("utf-8", "replace")
    produced = first_int(*outputs["completion_tokens"])
    if "prompt_tokens" in outputs:  # the contract sends it with every response; the final one must have it
        delivered.prompt_tokens = first_int(*outputs["prompt_tokens"])
    if not is_final_response(response):
        return mesh_pb2.GenerateChunk(text=text, token_index=max(produced - 1, 0)) if text else None
    prompt = first_int(*outputs["prompt_tokens"])
    finish = first_bytes(outputs["finish_reason"][1]).decode()
    record_placement(response, metadata)
    return mesh_pb2.GenerateChunk(
        text=text, token_index=max(produced - 1, 0),
        finish_reason=_FINISH.get(finish, mesh_pb2.FINISH_REASON_STOP),
        usage=mesh_pb2.Usage(prompt_tokens=prompt, completion_tokens=produced, total_tokens=prompt + produced),
        metadata=metadata,
    )

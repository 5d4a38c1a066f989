"""Forwarding what is ready as one message: when the router's writer finds several responses of one generation
queued behind the one it is sending, it merges them into one delta (the generation contract lets a delta span
tokens: docs/adding-a-model.md). Under light load nothing waits and every token goes out on its own; as load
rises the writer falls behind, responses queue and messages per token fall, which is when each message's cost
matters. The caller reads the same text, token ids and counts either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from tritonclient.grpc import service_pb2

from services.common.kserve import encode_bytes, only_bytes

# A response on its way to the caller, with the key of the request it answers (requests of one stream interleave).
Relayed = tuple[int, service_pb2.ModelStreamInferResponse]

# How each output of the generation contract combines: deltas join, counts and the finish reason are the latest.
_DELTAS = {"text_output": "BYTES", "token_id": "INT32"}
_LATEST = {"finish_reason", "prompt_tokens", "completion_tokens"}
_FINAL = "triton_final_response"


def _mergeable(earlier: service_pb2.ModelInferResponse, later: service_pb2.ModelInferResponse) -> bool:
    """Two responses of one generation that can travel as one: the earlier not final, both with the contract's
    outputs only, in the same order, in raw form; a text delta of exactly one element."""
    final = earlier.parameters.get(_FINAL)
    if final is not None and final.bool_param:
        return False
    if len(earlier.outputs) != len(later.outputs) or len(earlier.raw_output_contents) != len(earlier.outputs) \
            or len(later.raw_output_contents) != len(later.outputs):
        return False
    for index, (a, b) in enumerate(zip(earlier.outputs, later.outputs, strict=True)):
        if a.name != b.name or a.datatype != b.datatype:
            return False
        if a.name in _DELTAS:
            if a.datatype != _DELTAS[a.name]:
                return False
            if a.datatype == "BYTES" and (list(a.shape) != [1] or list(b.shape) != [1]
                                          or only_bytes(earlier.raw_output_contents[index]) is None
                                          or only_bytes(later.raw_output_contents[index]) is None):
                return False
        elif a.name not in _LATEST:
            return False
    return True


def _merge_into(later: service_pb2.ModelInferResponse, earlier: service_pb2.ModelInferResponse) -> None:
    """`later` becomes the delta of both: its counts, flags and parameters stay, the deltas gain earlier's."""
    for index, output in enumerate(later.outputs):
        if output.name not in _DELTAS:
            continue
        before, after = earlier.raw_output_contents[index], later.raw_output_contents[index]
        if output.datatype == "BYTES":
            later.raw_output_contents[index] = encode_bytes([only_bytes(before) + only_bytes(after)])
        else:
            later.raw_output_contents[index] = before + after
            del output.shape[:]
            output.shape.append(len(later.raw_output_contents[index]) // 4)


@dataclass(frozen=True)
class Outbox:
    """Where one request's relay leaves its responses for the stream's writer."""

    queue: asyncio.Queue[Relayed | None]
    key: int

    def put(self, response: service_pb2.ModelStreamInferResponse) -> None:
        self.queue.put_nowait((self.key, response))


def coalesced(ready: Iterable[Relayed]) -> list[service_pb2.ModelStreamInferResponse]:
    """Ready responses, keyed by the request they answer, in order, with each run of one request's mergeable
    responses merged into its last one. Responses of other requests keep their places; errors never merge."""
    out: list[service_pb2.ModelStreamInferResponse] = []
    keys: list[int] = []
    for key, response in ready:
        if (out and keys[-1] == key and not response.error_message and not out[-1].error_message
                and _mergeable(out[-1].infer_response, response.infer_response)):
            _merge_into(response.infer_response, out[-1].infer_response)
            out[-1] = response
            continue
        out.append(response)
        keys.append(key)
    return out

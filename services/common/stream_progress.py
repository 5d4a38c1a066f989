"""What a generation stream has delivered so far, and the request that continues it elsewhere: read by whoever
carries the stream (the router relaying it, or a gateway streaming from the replica its lease names).

A model that can be resumed (smollm2) sends, with each token's response, the token id behind it (`token_id`)
and accepts the ids already delivered as `resume_tokens`: it replays them into its context and its text
decoder without sending them again. So when a replica dies mid-stream the router asks another replica to go
on from exactly what the caller has: greedy and seeded generations continue as the dead replica would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import service_pb2

from services.common.kserve import RESUME_INPUT

TOKEN_OUTPUT = "token_id"


def _output_index(response: service_pb2.ModelInferResponse, name: str) -> int:
    return next((i for i, output in enumerate(response.outputs) if output.name == name), -1)


def _input_values(request: service_pb2.ModelInferRequest, name: str) -> tuple[int, list[int]]:
    index = next((i for i, tensor in enumerate(request.inputs) if tensor.name == name), -1)
    if index < 0:
        return -1, []
    if request.raw_input_contents:
        return index, np.frombuffer(request.raw_input_contents[index], dtype="<i4").tolist()
    return index, list(request.inputs[index].contents.int_contents)


@dataclass
class StreamProgress:
    responses: int = 0
    # False once a response arrived without a token id: that model cannot be resumed.
    resumable: bool = True
    # The final response once delivered (its usage settles the request's cost in the fair queues).
    last: service_pb2.ModelInferResponse | None = None
    # Token ids as they came (little-endian INT32 bytes), decoded only for a resume: this runs per token.
    _token_bytes: list[bytes] = field(default_factory=list)
    _token_count: int = 0
    # Where token_id sits among a response's outputs: one model's responses keep one order.
    _index: int = -1

    def delivered(self, response: service_pb2.ModelInferResponse, final: bool) -> None:
        """Note a response that was passed on to the caller."""
        self.responses += 1
        if final:
            self.last = response
        index, outputs = self._index, response.outputs
        if index < 0 or index >= len(outputs) or outputs[index].name != TOKEN_OUTPUT:
            index = self._index = _output_index(response, TOKEN_OUTPUT)
        if index < 0 or index >= len(response.raw_output_contents):
            self.resumable = self.resumable and final
            return
        raw = response.raw_output_contents[index]
        self._token_bytes.append(raw)
        self._token_count += len(raw) // 4

    @property
    def tokens(self) -> list[int]:
        return np.frombuffer(b"".join(self._token_bytes), dtype="<i4").tolist()

    @property
    def started(self) -> bool:
        return self.responses > 0

    @property
    def tokens_sent(self) -> int:
        return self._token_count

    def resume_request(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferRequest:
        """The original request plus every token delivered so far (after any the caller itself resumed from)."""
        resumed = service_pb2.ModelInferRequest()
        resumed.CopyFrom(request)
        index, earlier = _input_values(resumed, RESUME_INPUT)
        tokens = np.asarray(earlier + self.tokens, dtype="<i4")
        if index >= 0:
            del resumed.inputs[index]
            if resumed.raw_input_contents:
                del resumed.raw_input_contents[index]
        tensor = resumed.inputs.add(name=RESUME_INPUT, datatype="INT32", shape=[len(tokens)])
        if resumed.raw_input_contents or not resumed.inputs[:-1]:
            resumed.raw_input_contents.append(tokens.tobytes())
        else:
            tensor.contents.int_contents.extend(tokens.tolist())
        return resumed

"""In-process stand-ins for the gRPC stubs the orchestration code calls: scripted KServe streams (tokens, then an
end or a failure), a cache client that records what it was asked to store or release, a servicer context. They
implement only what the code under test touches, so a test reads as the conversation it checks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc.aio import AioRpcError, Metadata
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import cache_pb2
from services.common.kserve import encode_bytes
from services.common.wire import TENANT_HEADER


def rpc_error(code: grpc.StatusCode, details: str = "") -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details)


def add_output(response: service_pb2.ModelInferResponse, name: str, datatype: str, raw: bytes,
               shape: list[int]) -> None:
    response.outputs.add(name=name, datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)


def token(text: str, produced: int, token_id: int | None = None, finish: str = "",
          prompt_tokens: int = 3) -> service_pb2.ModelStreamInferResponse:
    """One response of a generate model (docs/adding-a-model.md's contract); with `finish`, the final one."""
    response = service_pb2.ModelInferResponse(model_name="llm_t", model_version="1")
    add_output(response, "text_output", "BYTES", encode_bytes([text.encode()]), [1])
    add_output(response, "finish_reason", "BYTES", encode_bytes([finish.encode()]), [1])
    add_output(response, "prompt_tokens", "INT32", np.array([prompt_tokens], "<i4").tobytes(), [1])
    add_output(response, "completion_tokens", "INT32", np.array([produced], "<i4").tobytes(), [1])
    ids = [] if token_id is None else [token_id]
    add_output(response, "token_id", "INT32", np.array(ids, "<i4").tobytes(), [len(ids)])
    if finish:
        response.parameters["triton_final_response"].bool_param = True
    return service_pb2.ModelStreamInferResponse(infer_response=response)


@dataclass
class ScriptedCall:
    """A server stream: its items in order, then the end, or `fails_with` raised after them."""

    items: list[service_pb2.ModelStreamInferResponse]
    fails_with: AioRpcError | None = None
    cancelled: bool = False
    request: service_pb2.ModelInferRequest | None = None
    _next: int = 0

    def __aiter__(self) -> ScriptedCall:
        return self

    async def __anext__(self) -> service_pb2.ModelStreamInferResponse:
        if self.cancelled:
            raise rpc_error(grpc.StatusCode.CANCELLED, "cancelled")
        if self._next < len(self.items):
            self._next += 1
            return self.items[self._next - 1]
        if self.fails_with is not None:
            raise self.fails_with
        raise StopAsyncIteration

    def cancel(self) -> bool:
        self.cancelled = True
        return True


@dataclass
class ScriptedStreams:
    """A KServe stub whose ModelStreamInfer hands out the scripted calls in order, whoever asks."""

    calls: list[ScriptedCall]
    made: list[ScriptedCall] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)

    def for_replica(self, name: str) -> _ReplicaStub:
        return _ReplicaStub(self, name)

    def next_call(self, requests: Iterable[service_pb2.ModelInferRequest], replica: str = "") -> ScriptedCall:
        call = self.calls[len(self.made)]
        call.request = service_pb2.ModelInferRequest()
        call.request.CopyFrom(next(iter(requests)))
        self.made.append(call)
        self.replicas.append(replica)
        return call

    def ModelStreamInfer(self, requests, timeout=None, metadata=None) -> ScriptedCall:
        return self.next_call(requests)


@dataclass
class _ReplicaStub:
    streams: ScriptedStreams
    name: str
    unary: list[service_pb2.ModelInferRequest] = field(default_factory=list)

    def ModelStreamInfer(self, requests, timeout=None, metadata=None) -> ScriptedCall:
        return self.streams.next_call(requests, self.name)

    async def ModelInfer(self, request, timeout=None, metadata=None):  # noqa: ASYNC109 - the stub's signature
        sent = service_pb2.ModelInferRequest()
        sent.CopyFrom(request)
        self.unary.append(sent)
        return service_pb2.ModelInferResponse(model_name=request.model_name, model_version=request.model_version)


@dataclass
class RecordingCache:
    """The gateway's CacheClient: a scripted lookup reply (and direct exact read), and every store and release it
    was asked for."""

    reply: cache_pb2.LookupReply | None
    stored: list[cache_pb2.StoreRequest] = field(default_factory=list)
    released: list[cache_pb2.ReleaseRequest] = field(default_factory=list)
    direct: cache_pb2.CachedResponse | None = None
    looked_up: bool = False
    asked: list[cache_pb2.LookupRequest] = field(default_factory=list)

    async def exact_hit(self, scope: cache_pb2.CacheScope, request) -> cache_pb2.CachedResponse | None:
        return self.direct

    async def lookup(self, request: cache_pb2.LookupRequest, deadline_s: float) -> cache_pb2.LookupReply | None:
        self.looked_up = True
        self.asked.append(request)
        return self.reply

    def store(self, request: cache_pb2.StoreRequest) -> None:
        self.stored.append(request)

    def release(self, request: cache_pb2.ReleaseRequest) -> None:
        self.released.append(request)


@dataclass
class FakeContext:
    """A servicer context: the caller's tenant header and no deadline."""

    tenant: str = "tenant-1"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TENANT_HEADER, self.tenant),)

    def time_remaining(self) -> float | None:
        return None


def word_tokenizer_file(directory: Path) -> str:
    """A tokenizer with MiniLM's pre-tokenizer (BERT's: words and punctuation) and no vocabulary, written where the
    Chunker can load it: the chunking tests need token offsets, not MiniLM's word pieces, and must run on a
    checkout where `make models` has not exported the real tokenizer.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import BertPreTokenizer

    tokenizer = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = BertPreTokenizer()
    path = directory / "word-tokenizer.json"
    tokenizer.save(str(path))
    return str(path)

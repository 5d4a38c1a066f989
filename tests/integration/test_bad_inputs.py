"""Every bad input gets a precise status and a message a person can act on; the servers stay up."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import mesh_pb2
from services.common.kserve import InferRequestBuilder
from tests.conftest import AUTH, EMBEDDER, LLM, chat

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _generate(mesh, request, metadata=AUTH):
    return list(mesh.Generate(request, metadata=metadata, timeout=60))


def _embed(mesh, request, metadata=AUTH):
    return mesh.Embed(request, metadata=metadata, timeout=60)


CASES = [
    ("empty messages", _generate, mesh_pb2.GenerateRequest(model=LLM, max_tokens=8), AUTH, INVALID,
     "messages is empty"),
    ("1 MB prompt", _generate, chat("x" * 1_000_000), AUTH, INVALID, "prompt is 1000000 characters"),
    ("prompt over the context window", _generate, chat("hello " * 4000, max_tokens=16), AUTH, INVALID,
     "exceeds the 2048-token context"),
    ("max_tokens 0", _generate, chat("hi", max_tokens=0), AUTH, INVALID, "max_tokens must be within 1..1024"),
    ("max_tokens 100000", _generate, chat("hi", max_tokens=100_000), AUTH, INVALID, "got 100000"),
    ("temperature -1", _generate, chat("hi", temperature=-1.0), AUTH, INVALID, "temperature must be within [0, 2]"),
    ("top_p 0", _generate, chat("hi", top_p=0.0), AUTH, INVALID, "top_p must be within (0, 1]"),
    ("five stop sequences", _generate, chat("hi", stop=["a", "b", "c", "d", "e"]), AUTH, INVALID, "5 stop sequences"),
    ("role unspecified", _generate,
     mesh_pb2.GenerateRequest(model=LLM, max_tokens=4, messages=[mesh_pb2.ChatMessage(content="hi")]), AUTH, INVALID,
     "messages[0].role"),
    ("unknown model", _generate, mesh_pb2.GenerateRequest(model="gpt-17", max_tokens=4,
                                                          messages=chat("hi").messages),
     AUTH, grpc.StatusCode.NOT_FOUND, "unknown model 'gpt-17'"),
    ("embedder used for generation", _generate,
     mesh_pb2.GenerateRequest(model=EMBEDDER, max_tokens=4, messages=chat("hi").messages),
     AUTH, grpc.StatusCode.NOT_FOUND, "available: ['smollm2-135m-instruct']"),
    ("missing API key", _generate, chat("hi"), (), grpc.StatusCode.UNAUTHENTICATED, "missing credentials"),
    ("wrong API key", _generate, chat("hi"), (("x-api-key", "not-a-key"),), grpc.StatusCode.UNAUTHENTICATED,
     "invalid API key"),
    ("wrong bearer token", _embed, mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["a"]),
     (("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
    ("batch of 10,000 texts", _embed, mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["t"] * 10_000), AUTH, INVALID,
     "10000 texts; the limit is 256"),
    ("empty text", _embed, mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["ok", "  "]), AUTH, INVALID,
     "texts[1] is empty"),
    ("no texts", _embed, mesh_pb2.EmbedRequest(model=EMBEDDER), AUTH, INVALID, "texts is empty"),
    ("oversize text", _embed, mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["y" * 9000]), AUTH, INVALID,
     "texts[0] is 9000 characters"),
    ("no model", _embed, mesh_pb2.EmbedRequest(texts=["a"]), AUTH, INVALID, "model is required"),
    # Found by tests/integration/test_fuzz.py: it travels in a header, and a non-ASCII one made the router call
    # fail INTERNAL.
    ("non-ASCII request_id", _generate, chat("hi", request_id="réq\x00"), AUTH, INVALID, "printable ASCII"),
    ("non-ASCII request_id on Embed", _embed, mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["a"], request_id="é"),
     AUTH, INVALID, "printable ASCII"),
]


@pytest.mark.parametrize(("name", "call", "request_message", "metadata", "code", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_public_request(mesh, name, call, request_message, metadata, code, message):
    with pytest.raises(grpc.RpcError) as info:
        call(mesh, request_message, metadata)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()


def test_bad_kserve_requests(channel):
    kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    unknown = InferRequestBuilder("no-such-model").add_bytes("TEXT", [b"a"], [1, 1]).build()
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(unknown, metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    wrong_input = InferRequestBuilder(EMBEDDER).add_array("NOPE", np.zeros((1, 2), np.float32)).build()
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(wrong_input, metadata=AUTH, timeout=10)
    assert info.value.code() == INVALID
    assert "TEXT" in info.value.details() or "NOPE" in info.value.details()
    malformed = InferRequestBuilder(LLM).add_bytes("messages", [b"{not json"]).build()
    responses = list(kserve.ModelStreamInfer(iter([malformed]), metadata=AUTH, timeout=30))
    assert len(responses) == 1 and "messages must be UTF-8 JSON" in responses[0].error_message


def test_servers_survive_the_bad_inputs(mesh, stack):
    for process in stack.processes.values():
        process.ensure_alive()
    text = "".join(c.text for c in mesh.Generate(chat("Say yes.", max_tokens=3), metadata=AUTH, timeout=60))
    assert text
    ready = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(stack.router_address))
    assert ready.ServerReady(service_pb2.ServerReadyRequest(), timeout=5).ready


def test_every_public_method_refuses_a_call_without_credentials(channel):
    """Authentication is one interceptor over both public services, not a line in each handler: every method
    (and any added later) answers UNAUTHENTICATED to a caller with no key, before its handler runs."""
    services = [mesh_pb2.DESCRIPTOR.services_by_name["InferenceMesh"],
                service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
    checked = 0
    for service in services:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            empty = message_factory.GetMessageClass(method.input_type)().SerializeToString()
            if method.client_streaming and method.server_streaming:
                call = channel.stream_stream(path)(iter([empty]), timeout=10)
            elif method.client_streaming:
                call = channel.stream_unary(path).future(iter([empty]), timeout=10)
            elif method.server_streaming:
                call = channel.unary_stream(path)(empty, timeout=10)
            else:
                call = channel.unary_unary(path).future(empty, timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                if method.server_streaming:
                    list(call)
                else:
                    call.result()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
            checked += 1
    assert checked >= 20

"""Stock tritonclient (KServe v2 gRPC) against the gateway, unchanged but for the API key header."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import EMBEDDER, KEYS, LLM

HEADERS = {"x-api-key": KEYS["tenant-b"]}


@pytest.fixture(scope="module")
def client(stack):
    c = triton_grpc.InferenceServerClient(stack.gateway_address)
    yield c
    c.close()


def test_server_and_model_state(client):
    assert client.is_server_live(headers=HEADERS)
    assert client.is_server_ready(headers=HEADERS)
    assert client.is_model_ready(EMBEDDER, headers=HEADERS)
    meta = client.get_model_metadata(EMBEDDER, headers=HEADERS)
    assert meta.name == EMBEDDER
    assert [o.name for o in meta.outputs] == ["EMBEDDING"]


def test_model_infer(client):
    text = triton_grpc.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"hello world"], [b"good morning"]], dtype=object))
    result = client.infer(EMBEDDER, [text], headers=HEADERS)
    vectors = result.as_numpy("EMBEDDING")
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    params = result.get_response().parameters
    assert params["mesh_pool"].string_param == "cpu"


def test_decoupled_streaming_infer(client):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=HEADERS)
    try:
        messages = triton_grpc.InferInput("messages", [1], "BYTES")
        messages.set_data_from_numpy(np.array([b'[{"role": "user", "content": "Say hi."}]'], dtype=object))
        max_tokens = triton_grpc.InferInput("max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([6], dtype=np.int32))
        client.async_stream_infer(LLM, [messages, max_tokens], request_id="kserve-stream-1")
        pieces = []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            pieces.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert int(result.as_numpy("completion_tokens")[0]) == 6
        assert result.as_numpy("finish_reason")[0] == b"length"
        assert "".join(pieces).strip()
    finally:
        client.stop_stream()


def test_missing_key_is_refused(client):
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready(EMBEDDER)
    assert "UNAUTHENTICATED" in str(info.value.status())

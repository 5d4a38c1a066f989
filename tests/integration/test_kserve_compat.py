"""Stock tritonclient (KServe v2 gRPC) against the gateway, unchanged but for the API key header."""

from __future__ import annotations

import queue
import time

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


def test_model_config_answers_for_the_public_name(client):
    config = client.get_model_config(EMBEDDER, headers=HEADERS, as_json=True)["config"]
    assert config["name"] == EMBEDDER
    assert config["max_batch_size"] == 64
    assert [i["name"] for i in config["input"]] == ["TEXT"]
    llm = client.get_model_config(LLM, headers=HEADERS).config
    assert llm.name == LLM and llm.model_transaction_policy.decoupled
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("no-such-model", headers=HEADERS)


def test_model_statistics_count_what_the_mesh_served(client, stack):
    def served() -> int:
        stats = client.get_inference_statistics(EMBEDDER, headers=HEADERS).model_stats
        assert {s.name for s in stats} == {EMBEDDER}
        return sum(s.inference_stats.success.count for s in stats)

    before = served()
    text = triton_grpc.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"statistics please"]], dtype=object))
    client.infer(EMBEDDER, [text], headers=HEADERS)
    # Triton counts a request a moment after its response: wait (bounded) for the count, then it must be exact.
    deadline = time.monotonic() + 5
    while served() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served() == before + 1
    every = {s.name for s in client.get_inference_statistics(headers=HEADERS).model_stats}
    assert {EMBEDDER, LLM} <= every


def test_server_metadata_and_a_read_only_repository(client):
    server = client.get_server_metadata(headers=HEADERS)
    assert server.name == "inference-mesh" and server.version
    assert "statistics" in server.extensions
    index = {m.name: m for m in client.get_model_repository_index(headers=HEADERS).models}
    assert index[EMBEDDER].state == "READY" and index[LLM].state == "READY"
    assert client.is_model_ready(LLM, headers=HEADERS)
    assert not client.is_model_ready("no-such-model", headers=HEADERS)
    with pytest.raises(InferenceServerException, match="read-only"):
        client.load_model(EMBEDDER, headers=HEADERS)
    with pytest.raises(InferenceServerException, match="read-only"):
        client.unload_model(EMBEDDER, headers=HEADERS)


def test_metadata_reads_never_wait_behind_generations(stack):
    """With the CPU pool's one LLM slot per replica taken by a generation, tritonclient's metadata, config, ready
    and statistics reads through Envoy still answer at once (a metadata read once took a generation slot and was
    refused RESOURCE_EXHAUSTED at a bound it then misnamed)."""
    edge = triton_grpc.InferenceServerClient(f"localhost:{stack.ports.edge}", ssl=True,
                                             root_certificates=str(stack.pki.ca_cert))
    generations: queue.Queue = queue.Queue()
    edge.start_stream(callback=lambda result, error: generations.put((result, error)), headers=HEADERS)
    try:
        messages = triton_grpc.InferInput("messages", [1], "BYTES")
        story = f'[{{"role": "user", "content": "Tell a long story about lighthouse {time.time_ns()}."}}]'
        messages.set_data_from_numpy(np.array([story.encode()], dtype=object))
        max_tokens = triton_grpc.InferInput("max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([400], dtype=np.int32))
        edge.async_stream_infer(LLM, [messages, max_tokens], request_id="kserve-busy-1")
        _first, error = generations.get(timeout=60)  # the generation is under way: its slot is taken
        assert error is None, error
        started = time.monotonic()
        meta = edge.get_model_metadata(LLM, headers=HEADERS, client_timeout=10)
        assert meta.name == LLM and {o.name for o in meta.outputs} >= {"text_output", "completion_tokens"}
        assert edge.get_model_config(LLM, headers=HEADERS, client_timeout=10).config.name == LLM
        assert edge.is_model_ready(LLM, headers=HEADERS, client_timeout=10)
        assert edge.get_inference_statistics(LLM, headers=HEADERS, client_timeout=10).model_stats
        assert time.monotonic() - started < 5.0, "metadata waited for the generation"
        finals = [r for r, e in list(generations.queue)
                  if e is None and r.get_response().parameters["triton_final_response"].bool_param]
        assert not finals, "the generation had ended: the reads did not run beside it"
    finally:
        edge.stop_stream(cancel_requests=True)
        edge.close()

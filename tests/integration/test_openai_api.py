"""The OpenAI-compatible API through the real Envoy (TLS, rate limits) and gateways, called with the official
openai SDK (sync and async), curl, and LangChain's ChatOpenAI: the same mesh as the gRPC API underneath."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import openai
import pytest

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.conftest import EMBEDDER, KEYS, LLM, chat, triton_metric
from tests.integration.test_cache import wait_until_cached
from tests.integration.test_retrieval import doc, upsert
from tools.pki import mint_jwt
from tools.stack import LocalStack

KEY = KEYS["tenant-openai"]
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
QUESTION = "Name three colours."


def _trust(stack: LocalStack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.pki.ca_cert))


def _client(stack: LocalStack, key: str = KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"https://localhost:{stack.ports.edge}/v1", max_retries=0,
                         http_client=httpx.Client(verify=_trust(stack)), **kwargs)


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with _client(stack) as c:
        yield c


@pytest.fixture(scope="module")
def edge_mesh(stack: LocalStack) -> Iterator[mesh_pb2_grpc.InferenceMeshStub]:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{stack.ports.edge}", credentials) as channel:
        yield mesh_pb2_grpc.InferenceMeshStub(channel)


def _grpc_text(mesh: mesh_pb2_grpc.InferenceMeshStub, request: mesh_pb2.GenerateRequest
               ) -> tuple[str, mesh_pb2.GenerateChunk]:
    chunks = list(mesh.Generate(request, metadata=GRPC_AUTH, timeout=120))
    return "".join(c.text for c in chunks), chunks[-1]


def test_models_are_listed_and_read(client):
    listed = {m.id: m for m in client.models.list()}
    assert {LLM, EMBEDDER} <= set(listed)
    assert listed[LLM].object == "model" and listed[LLM].owned_by == "inference-mesh"
    assert client.models.retrieve(EMBEDDER).id == EMBEDDER
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_chat_completion_is_the_grpc_answer(client, edge_mesh):
    """Same greedy text and token counts as the gRPC API; the second call is an exact cache hit, said in a
    header and in the mesh extension."""
    expected, last = _grpc_text(edge_mesh, chat(QUESTION, max_tokens=24, temperature=0.0,
                                                cache_mode=mesh_pb2.CACHE_MODE_BYPASS))
    raw = client.chat.completions.with_raw_response.create(
        model=LLM, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0,
        extra_body={"cache_mode": "refresh"})
    answer = raw.parse()
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == last.usage.prompt_tokens
    assert answer.usage.completion_tokens == 24 == answer.usage.total_tokens - answer.usage.prompt_tokens
    assert raw.headers["x-mesh-cache"] == "miss"
    assert raw.headers["x-ratelimit-limit-requests"] == "100000"
    again = client.chat.completions.with_raw_response.create(
        model=LLM, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0)
    assert again.headers["x-mesh-cache"] == "exact-hit"
    hit = again.parse()
    assert hit.choices[0].message.content == expected
    assert hit.model_extra["mesh"]["cache_status"] == "CACHE_STATUS_EXACT_HIT"
    assert hit.model_extra["mesh"]["tenant"] == "tenant-openai"


def test_streamed_chat_with_usage(client):
    whole = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "Tell a story."}],
                                           max_tokens=16, temperature=0, extra_body={"cache_mode": "bypass"})
    stream = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"cache_mode": "bypass"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_completions_send_the_prompt_as_one_user_turn(client):
    chat_answer = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=12, temperature=0)
    completion = client.completions.create(model=LLM, prompt=QUESTION, max_tokens=12, temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == chat_answer.choices[0].message.content
    streamed = client.completions.create(model=LLM, prompt=QUESTION, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text


def test_embeddings_float_and_base64_are_the_grpc_vectors(client, edge_mesh):
    texts = ["the cat sat on the mat", "a dog barked"]
    expected = edge_mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=texts), metadata=GRPC_AUTH, timeout=30)
    as_floats = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    # The SDK asks for base64 by default and decodes it itself.
    as_base64 = client.embeddings.create(model=EMBEDDER, input=texts)
    for answer in (as_floats, as_base64):
        assert [d.index for d in answer.data] == [0, 1]
        for got, want in zip(answer.data, expected.embeddings, strict=True):
            np.testing.assert_allclose(got.embedding, want.values, rtol=1e-6, atol=1e-7)
    with pytest.raises(openai.BadRequestError, match="384-dimensional"):
        client.embeddings.create(model=EMBEDDER, input="x", dimensions=128)


def test_async_client_streams(stack):
    async def run() -> str:
        async with openai.AsyncOpenAI(api_key=KEY, base_url=f"https://localhost:{stack.ports.edge}/v1",
                                      http_client=httpx.AsyncClient(verify=_trust(stack))) as client:
            stream = await client.chat.completions.create(
                model=LLM, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0,
                stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    with _client(stack) as sync:
        expected = sync.chat.completions.create(model=LLM, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=8, temperature=0).choices[0].message.content
    assert asyncio.run(run()) == expected


@pytest.mark.parametrize(("body", "error", "param"), [
    ({"temperature": 5}, openai.BadRequestError, None),
    ({"n": 2}, openai.BadRequestError, "n"),
    ({"max_tokens": 100_000}, openai.BadRequestError, None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, openai.BadRequestError, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     openai.BadRequestError, None),
    ({"model": "no-such-model"}, openai.NotFoundError, None),
])
def test_bad_requests_raise_the_sdks_own_errors(client, body, error, param):
    request = {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    extra = {k: request.pop(k) for k in ("tools",) if k in request}
    with pytest.raises(error) as caught:
        client.chat.completions.create(**request, extra_body=extra or None)
    assert caught.value.body["message"]
    assert caught.value.type in {"invalid_request_error"}
    if param is not None:
        assert caught.value.param == param


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("chat/completions", {"max_tokens": -5}, "max_tokens"),
    ("chat/completions", {"max_tokens": 99999999999}, "max_tokens"),
    ("chat/completions", {"max_completion_tokens": -5}, "max_completion_tokens"),
    ("chat/completions", {"seed": 1e23}, "seed"),
    ("chat/completions", {"seed": 2**64}, "seed"),
    ("chat/completions", {"retrieval": {"top_k": 10**12}}, "retrieval.top_k"),
    ("completions", {"max_tokens": 99999999999}, "max_tokens"),
    ("embeddings", {"dimensions": 2**40}, "dimensions"),
])
def test_out_of_range_numbers_are_400s_naming_the_field_never_500s(stack, path, fields, param):
    """Each of these once reached the proto request unchecked and failed there with a 500 and a traceback."""
    body = {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if path == "completions":
        body = {"model": LLM, "prompt": "hi"}
    if path == "embeddings":
        body = {"model": EMBEDDER, "input": "hi"}
    answer = httpx.post(f"https://localhost:{stack.ports.edge}/v1/{path}", json={**body, **fields}, timeout=30,
                        headers={"authorization": f"Bearer {KEY}"}, verify=_trust(stack))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], error


def test_a_bad_request_id_on_the_documents_do_not_answer_path_is_a_400(stack):
    """Ask answered "the documents do not answer" before it checked request_id, and the reply that echoed it
    dropped the connection (a 503 at the edge)."""
    body = {"model": LLM, "messages": [{"role": "user", "content": "Who won the 1966 football World Cup final?"}],
            "max_tokens": 8, "retrieval": {"top_k": 2}, "request_id": "bad\u0007id\nx"}
    answer = httpx.post(f"https://localhost:{stack.ports.edge}/v1/chat/completions", json=body, timeout=30,
                        headers={"authorization": f"Bearer {KEY}"}, verify=_trust(stack))
    assert answer.status_code == 400, answer.text
    assert "request_id must be printable ASCII" in answer.json()["error"]["message"]


def test_unknown_mesh_option_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: cache_moed"):
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"cache_moed": "bypass"})


def test_bad_key_and_two_credentials(stack):
    with _client(stack, key="not-a-key") as bad, pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.code == "invalid_api_key"
    # Refused by Envoy itself, in the same shape.
    with _client(stack, default_headers={"x-api-key": KEY}) as doubled, \
            pytest.raises(openai.AuthenticationError, match="exactly one credential"):
        doubled.models.list()


def test_a_jwt_is_an_api_key_to_the_sdk(stack):
    """Envoy verifies the JWT and hands the gateway its tenant claim; an expired one is refused in OpenAI's shape."""
    with _client(stack, key=mint_jwt(stack.pki, "tenant-openai")) as signed:
        answer = signed.chat.completions.with_raw_response.create(
            model=LLM, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0)
    assert answer.parse().model_extra["mesh"]["tenant"] == "tenant-openai"
    with _client(stack, key=mint_jwt(stack.pki, "tenant-openai", ttl_s=-600)) as expired, \
            pytest.raises(openai.AuthenticationError, match=r"(?i)expired"):
        expired.models.list()


def test_request_rate_limit_is_a_rate_limit_error(stack):
    """The tenant's request limit at the edge (burst 3): RateLimitError with retry-after and the limit headers."""
    with _client(stack, key=KEYS["tenant-openai-limited"]) as limited, \
            pytest.raises(openai.RateLimitError) as caught:
        for _ in range(10):
            limited.models.list()
    response = caught.value.response
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert caught.value.code == "rate_limit_exceeded"
    assert "60 requests/min" in caught.value.message


def test_token_budget_is_a_rate_limit_error(stack):
    """The gateway's token budget (300 tokens/min): once spent, 429 with retry-after, from the mesh's error."""
    with _client(stack, key=KEYS["tenant-openai-budget"]) as spender, \
            pytest.raises(openai.RateLimitError) as caught:
        for attempt in range(20):
            spender.chat.completions.create(
                model=LLM, messages=[{"role": "user", "content": f"Count to ten, take {attempt}."}],
                max_tokens=64, temperature=0, extra_body={"cache_mode": "bypass"})
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert "tokens" in caught.value.message


def test_disconnect_cancels_the_generation_in_triton(stack):
    tokens_before = triton_metric(stack, "mesh_llm_generated_tokens_total")
    cancelled_before = triton_metric(stack, "mesh_llm_cancelled_requests_total")
    with _client(stack) as client:
        stream = client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": "Tell a very long story about a dragon."}],
            max_tokens=1000, temperature=0, stream=True, extra_body={"cache_mode": "bypass"})
        for received, _ in enumerate(stream, start=1):
            if received == 5:
                break
        stream.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and triton_metric(stack, "mesh_llm_cancelled_requests_total") == \
            cancelled_before:
        time.sleep(0.2)
    assert triton_metric(stack, "mesh_llm_cancelled_requests_total") == cancelled_before + 1
    produced = triton_metric(stack, "mesh_llm_generated_tokens_total") - tokens_before
    assert produced < 300, f"{produced} tokens were generated for a stream closed after 5 chunks"


def test_retrieval_extension_cites_the_callers_documents(client, edge_mesh):
    upsert(edge_mesh, [doc("openai-kb-1", "The Zephyr-9 pump runs at 1450 rpm and is serviced every 90 days.")],
           metadata=GRPC_AUTH)
    answer = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "How often is the Zephyr-9 pump serviced?"}],
        max_tokens=24, temperature=0, extra_body={"retrieval": {"top_k": 2}})
    cited = answer.model_extra["citations"]
    assert cited and cited[0]["document_id"] == "openai-kb-1"
    streamed = list(client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "How often is the Zephyr-9 pump serviced?"}],
        max_tokens=24, temperature=0, stream=True, extra_body={"retrieval": {"top_k": 2}}))
    finishing = [c for c in streamed if c.choices and c.choices[0].finish_reason]
    assert finishing[0].model_extra["citations"] == cited
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        answer.choices[0].message.content
    unrelated = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Who won the 1966 football World Cup final?"}],
        max_tokens=24, temperature=0, extra_body={"retrieval": {"top_k": 2, "mode": "dense"}})
    assert unrelated.model_extra["mesh"]["documents_do_not_answer"] is True
    assert "do not answer" in unrelated.choices[0].message.content and unrelated.model_extra["citations"]
    with pytest.raises(openai.BadRequestError, match="exactly one message"):
        client.chat.completions.create(
            model=LLM, max_tokens=4, extra_body={"retrieval": {}},
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pump?"}])


def test_a_wrong_semantic_hit_is_reported_through_the_http_api(client, stack):
    system = {"role": "system", "content": "You answer gardening questions in one short sentence."}
    asked = [system, {"role": "user", "content": "How often should I water a cactus?"}]
    paraphrase = [system, {"role": "user", "content": "How often do I water a cactus?"}]
    client.chat.completions.create(model=LLM, messages=asked, max_tokens=8, temperature=0)
    wait_until_cached(stack, "tenant-openai", greedy_chat(paraphrase, 8), semantic=True)
    hit = client.chat.completions.with_raw_response.create(model=LLM, messages=paraphrase, max_tokens=8,
                                                           temperature=0)
    assert hit.headers["x-mesh-cache"] == "semantic-hit"
    entry = hit.parse().model_extra["mesh"]["cache_entry"]
    body = {"model": LLM, "messages": paraphrase, "max_tokens": 8, "temperature": 0, "cache_entry": entry}
    reported = httpx.post(f"https://localhost:{stack.ports.edge}/v1/mesh/cache/wrong-hit", json=body, timeout=30,
                          headers={"authorization": f"Bearer {KEY}"}, verify=_trust(stack))
    assert reported.status_code == 200 and reported.json() == {"recorded": True}
    again = client.chat.completions.with_raw_response.create(model=LLM, messages=paraphrase, max_tokens=8,
                                                             temperature=0)
    assert again.headers["x-mesh-cache"] == "miss"


def greedy_chat(messages: list[dict], max_tokens: int) -> mesh_pb2.GenerateRequest:
    roles = {"system": mesh_pb2.ROLE_SYSTEM, "user": mesh_pb2.ROLE_USER}
    return mesh_pb2.GenerateRequest(model=LLM, max_tokens=max_tokens, temperature=0.0, messages=[
        mesh_pb2.ChatMessage(role=roles[m["role"]], content=m["content"]) for m in messages])


def test_the_readmes_curl_example(stack):
    body = {"model": LLM, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": QUESTION}]}
    result = subprocess.run(
        ["curl", "-sS", "--http1.1", "--cacert", str(stack.pki.ca_cert),
         f"https://localhost:{stack.ports.edge}/v1/chat/completions", "-H", f"Authorization: Bearer {KEY}",
         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=60, check=True)
    answer = json.loads(result.stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]


def test_langchain_chat_model(stack):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model=LLM, api_key=KEY, base_url=f"https://localhost:{stack.ports.edge}/v1",
                       temperature=0, max_tokens=8, max_retries=0,
                       http_client=httpx.Client(verify=_trust(stack)))
    with _client(stack) as client:
        expected = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": QUESTION}],
                                                  max_tokens=8, temperature=0).choices[0].message.content
    assert model.invoke(QUESTION).content == expected
    assert "".join(part.content for part in model.stream(QUESTION)) == expected


def test_a_dribbled_body_holds_no_gateway_slot(stack):
    """Envoy receives an HTTP API body whole before it picks a gateway: clients that send headers and then trickle
    their bodies hold Envoy's bounded buffers, not the gateways' shared slots (512, for every tenant)."""
    import socket

    from tests.conftest import service_metric

    def in_flight() -> float:
        return sum(service_metric(metrics, "mesh_in_flight_requests", service="gateway")
                   for _, metrics in stack.ports.gateway_ports())

    body = json.dumps({"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    baseline = in_flight()
    dribblers = []
    try:
        for _ in range(6):
            raw = socket.create_connection(("127.0.0.1", stack.ports.edge), timeout=10)
            connection = _trust(stack).wrap_socket(raw, server_hostname="localhost")
            connection.sendall(head + body[:10])
            dribblers.append(connection)
        time.sleep(1.0)  # time for a gateway to have taken them, had they been passed on
        assert in_flight() == baseline, "dribbling clients hold gateway slots"
        for connection in dribblers:
            connection.sendall(body[10:])
        answers = [connection.recv(65536).split(b"\r\n", 1)[0] for connection in dribblers]
        assert all(b" 200 " in status for status in answers), answers
    finally:
        for connection in dribblers:
            connection.close()

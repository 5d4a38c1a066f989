"""The HTTP API fuzzed from its own OpenAPI document (GET /v1/openapi.json) with schemathesis, through Envoy on the
real stack: requests valid by the document and requests that break it on purpose, each answered with a 2xx or a
4xx in OpenAI's error shape, never a 5xx. Seeded (derandomize): the same cases every run, so a failure repeats.

The fuzz tenant's tier allows 300 tokens a minute: a generation the fuzz starts is short or refused up front, so
the run is bounded in time."""

from __future__ import annotations

import ssl
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from services.gateway.openai_http.openapi import document
from tests.conftest import KEYS

EXAMPLES = 40
HEADERS = {"authorization": f"Bearer {KEYS['tenant-fuzz']}"}
OPERATIONS = [f"{method.upper()} {path}" for path, methods in document()["paths"].items() for method in methods]


@pytest.fixture(scope="module")
def served(stack) -> schemathesis.BaseSchema:
    """The document as the edge serves it (no key needed), loaded by schemathesis."""
    context = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    with httpx.Client(verify=context, timeout=10) as client:
        answer = client.get(f"https://127.0.0.1:{stack.ports.edge}/v1/openapi.json")
    assert answer.status_code == 200, answer.text
    assert answer.json() == document()
    return schemathesis.openapi.from_dict(answer.json())


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_generated_request_gets_a_server_error(stack, served, label):
    operation = served.find_operation_by_label(label)
    assert operation is not None, label
    session = requests.Session()
    base_url = f"https://127.0.0.1:{stack.ports.edge}"
    statuses: Counter[int] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE)))
    def answered(case) -> None:
        response = case.call(base_url=base_url, session=session, headers=HEADERS, timeout=60,
                             verify=str(stack.pki.ca_cert))
        statuses[response.status_code] += 1
        sent = case.as_curl_command(headers=HEADERS)[:600]
        assert response.status_code < 500, (sent, response.status_code, response.text[:500])
        if response.status_code >= 400:
            try:
                error = response.json().get("error", {})
            except ValueError:
                error = {}
            assert {"message", "type", "code"} <= set(error), (sent, response.status_code, response.text[:300])

    answered()
    assert sum(statuses.values()) >= EXAMPLES, statuses



def test_a_header_with_an_underscore_is_dropped_never_passed_on(stack):
    """Found by the fuzz: refusing such a header was the HTTP/1 codec's plain "Bad Request" (not OpenAI's shape).
    Envoy now drops it, so a forged `x_mesh_jwt_tenant` (read as x-mesh-jwt-tenant by an upstream that treats _ as
    -) never reaches a gateway; the request is answered as the caller's own."""
    from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
    from tests.integration.test_edge import tls_channel

    forged = {"x_mesh_jwt_tenant": "tenant-victim", "x_mesh_edge_secret": "guess"}
    context = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    with httpx.Client(verify=context, timeout=60) as client:
        answer = client.post(f"https://127.0.0.1:{stack.ports.edge}/v1/embeddings", headers={**HEADERS, **forged},
                             json={"model": "all-minilm-l6-v2", "input": "x"})
        anonymous = client.get(f"https://127.0.0.1:{stack.ports.edge}/v1/models", headers=forged)
    assert answer.status_code == 200 and answer.json()["mesh"]["tenant"] == "tenant-fuzz", answer.text
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    with tls_channel(stack) as channel:
        reply = mesh_pb2_grpc.InferenceMeshStub(channel).Embed(
            mesh_pb2.EmbedRequest(model="all-minilm-l6-v2", texts=["x"]),
            metadata=(("x-api-key", KEYS["tenant-fuzz"]), *forged.items()), timeout=60)
    assert reply.metadata.tenant == "tenant-fuzz"

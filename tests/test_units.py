"""Pure unit tests: no servers."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.common.kserve import InferRequestBuilder, output_arrays
from services.common.tenants import Tenant, TenantConfig, Tier, hash_key
from services.gateway.auth import Authenticator
from services.gateway.errors import from_stream_error
from services.gateway.settings import RequestLimits
from services.gateway.validation import check_embed, check_generate
from services.router.balancer import LeastOutstandingBalancer, NoReplicaError
from services.router.registry import Registry
from services.router.replicas import ReplicaSet

ROOT = Path(__file__).resolve().parents[1]


def _load_stop_matcher():
    spec = importlib.util.spec_from_file_location("stop_matcher", ROOT / "triton_models/smollm2/1/stop_matcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StopMatcher


StopMatcher = _load_stop_matcher()


def feed_all(matcher, pieces: list[str]) -> str:
    out = ""
    for piece in pieces:
        out += matcher.feed(piece)
        if matcher.stopped:
            return out
    return out + matcher.flush()


@pytest.mark.parametrize(("pieces", "stops", "expected", "stopped"), [
    (["Hello", " wor", "ld"], [], "Hello world", False),
    (["one,", " two"], [","], "one", True),
    (["abc", "EN", "D tail"], ["END"], "abc", True),
    (["abc", "EN", "x"], ["END"], "abcENx", False),          # a partial match is released once it cannot match
    (["a", "b"], ["bc"], "ab", False),                        # held-back text is flushed at the end
    (["x<|", "stop|>y"], ["<|stop|>"], "x", True),
])
def test_stop_matcher(pieces, stops, expected, stopped):
    matcher = StopMatcher(stops)
    assert feed_all(matcher, pieces) == expected
    assert matcher.stopped is stopped


def test_stop_matcher_never_releases_a_prefix_of_a_stop():
    matcher = StopMatcher(["###"])
    assert matcher.feed("text #") == "text "
    assert matcher.feed("#") == ""
    assert matcher.feed("#") == "" and matcher.stopped


REGISTRY = {
    "pools": {"a100": {"gpu_class": "a100", "replicas": [{"name": "g0", "grpc": "127.0.0.1:1"}]},
              "cpu": {"gpu_class": "cpu", "replicas": [{"name": "c0", "grpc": "127.0.0.1:2"},
                                                       {"name": "c1", "grpc": "127.0.0.1:3"}]}},
    "models": {"llm": {"kind": "generate", "triton_model": "llm_t", "pools": ["a100", "cpu"], "max_output_tokens": 64}},
}


def test_registry_rejects_unknown_pools_and_duplicate_replicas():
    bad = {**REGISTRY, "models": {"m": {"kind": "embed", "triton_model": "x", "pools": ["h100"]}}}
    with pytest.raises(ValueError, match="unknown pools"):
        Registry.model_validate(bad)
    dup = {"pools": {"cpu": {"replicas": [{"name": "a", "grpc": "x:1"}, {"name": "a", "grpc": "x:2"}]}},
           "models": {}}
    with pytest.raises(ValueError, match="unique"):
        Registry.model_validate(dup)


async def test_balancer_prefers_pool_order_then_least_outstanding():
    registry = Registry.model_validate(REGISTRY)
    replicas = ReplicaSet(registry)
    by_name = {r.name: r for r in replicas.replicas}
    balancer = LeastOutstandingBalancer(replicas)
    model = registry.models["llm"]
    with pytest.raises(NoReplicaError):
        balancer.choose(model)
    by_name["c0"].ready_models = {"llm_t"}
    by_name["c1"].ready_models = {"llm_t"}
    by_name["c0"].in_flight = 3
    assert balancer.choose(model).name == "c1"
    by_name["c1"].in_flight = 5
    assert balancer.choose(model).name == "c0"
    by_name["g0"].ready_models = {"llm_t"}
    by_name["g0"].in_flight = 50
    assert balancer.choose(model).name == "g0", "the preferred pool wins while it has a ready replica"
    assert balancer.choose(model, exclude=frozenset({"g0"})).name == "c0"
    by_name["c0"].in_flight = by_name["c1"].in_flight = 0
    by_name["g0"].ready_models = set()
    assert {balancer.choose(model).name for _ in range(4)} == {"c0", "c1"}, "ties take turns"
    await replicas.close()


def test_api_keys_are_matched_by_hash():
    config = TenantConfig(tiers={"standard": Tier(requests_per_minute=300, burst=30)},
                          tenants=[Tenant(id="acme", tier="standard", api_key_sha256=[hash_key("s3cret")])])
    auth = Authenticator(config)
    assert auth.identify((("authorization", "Bearer s3cret"),))[0].tenant == "acme"
    assert auth.identify((("x-api-key", "s3cret"),))[0].tenant == "acme"
    assert auth.identify((("authorization", "bearer s3cret"),))[0].tenant == "acme"
    assert auth.identify((("x-api-key", "S3CRET"),)) == (None, "invalid API key")
    assert auth.identify(())[0] is None and "missing credentials" in auth.identify(())[1]
    assert "s3cret" not in repr(config)


def test_jwt_tenant_is_trusted_only_with_the_edge_secret():
    config = TenantConfig(tiers={"standard": Tier(requests_per_minute=300, burst=30)},
                          tenants=[Tenant(id="acme", tier="standard"), Tenant(id="other", tier="standard")])
    auth = Authenticator(config, edge_secret="edge-s3cret")
    claim = ("x-mesh-jwt-tenant", "acme")
    assert auth.identify((claim, ("x-mesh-edge-secret", "edge-s3cret")))[0].tenant == "acme"
    assert auth.identify((claim,))[0] is None, "a client cannot name its tenant without the edge"
    assert auth.identify((claim, ("x-mesh-edge-secret", "guess")))[0] is None
    unknown = auth.identify((("x-mesh-jwt-tenant", "nobody"), ("x-mesh-edge-secret", "edge-s3cret")))
    assert unknown[0] is None and "no configured tenant" in unknown[1]
    assert Authenticator(config).identify((claim, ("x-mesh-edge-secret", "")))[0] is None, "no secret, no trust"


def test_validation_limits():
    limits = RequestLimits()
    model = models_pb2.ModelInfo(name="llm", max_output_tokens=64)
    ok = mesh_pb2.GenerateRequest(model="llm", max_tokens=64,
                                  messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content="hi")])
    check_generate(ok, model, limits)
    nan = mesh_pb2.GenerateRequest()
    nan.CopyFrom(ok)
    nan.temperature = float("nan")
    with pytest.raises(Exception, match="temperature"):
        check_generate(nan, model, limits)
    check_embed(mesh_pb2.EmbedRequest(model="e", texts=["a"] * limits.max_embed_batch), limits)
    with pytest.raises(Exception, match="the limit is 256"):
        check_embed(mesh_pb2.EmbedRequest(model="e", texts=["a"] * (limits.max_embed_batch + 1)), limits)


def test_stream_errors_map_to_statuses():
    assert from_stream_error("INVALID_ARGUMENT: prompt too long").code == grpc.StatusCode.INVALID_ARGUMENT
    assert from_stream_error("UNAVAILABLE: no ready replica").code == grpc.StatusCode.UNAVAILABLE
    assert from_stream_error("something broke").code == grpc.StatusCode.INTERNAL


def test_kserve_tensors_round_trip():
    request = InferRequestBuilder("m").add_bytes("T", [b"a", b"", "é".encode()]).add_array(
        "N", np.array([[1.5, -2.0]], np.float32)).build()
    response = service_pb2.ModelInferResponse(raw_output_contents=request.raw_input_contents)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    arrays = output_arrays(response)
    assert list(arrays["T"]) == [b"a", b"", "é".encode()]
    np.testing.assert_array_equal(arrays["N"], np.array([[1.5, -2.0]], np.float32))


def test_filters_accept_metadata_expressions_and_expand_in():
    from services.retrieval.filters import to_milvus

    assert to_milvus('metadata["lang"] == "en"', 100) == 'metadata["lang"] == "en"'
    assert to_milvus('metadata["k"] in ["a", "b"] and not (metadata["n"] >= 3)', 200) == \
        '(metadata["k"] == "a" or metadata["k"] == "b") and not (metadata["n"] >= 3)'
    assert to_milvus("", 10) == ""
    # Literals alone cannot reach another field, so a tautology is allowed: it stays inside the tenant clause.
    assert to_milvus('metadata["a"] == "b" or 1 == 1', 100)


@pytest.mark.parametrize("bad", [
    'metadata["a"] == "b") or (tenant != "x"',  # closes the tenant clause
    'tenant == "other"',                         # names another field
    "pk != ''",                                  # single quotes and another field
    'metadata["a"] == "b"; drop',
    '((metadata["a"] == "b")',
])
def test_filters_reject_escapes(bad):
    from services.retrieval.filters import FilterError, to_milvus

    with pytest.raises(FilterError):
        to_milvus(bad, 100)


def test_chunker_windows_overlap_on_token_boundaries():
    from services.retrieval.chunking import Chunker

    chunker = Chunker(str(ROOT / "triton_models/minilm/1/tokenizer.json"), size=16, overlap=4)
    text = " ".join(f"word{i}" for i in range(60))
    chunks = chunker.split(text)
    assert len(chunks) > 3 and [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].text.startswith("word0") and chunks[-1].text.endswith("word59")
    for first, second in itertools.pairwise(chunks):
        assert first.text[-6:] in second.text
    assert chunker.split("   ") == []
    with pytest.raises(ValueError):
        Chunker(str(ROOT / "triton_models/minilm/1/tokenizer.json"), size=8, overlap=8)

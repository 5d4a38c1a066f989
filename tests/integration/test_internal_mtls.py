"""mTLS on every internal hop, on a real stack: Envoy → gateway and rate limits, gateway → router, cache,
retrieval and budgets, cache and retrieval → router, router → Triton (Triton's gRPC SSL). A gateway reached
around Envoy refuses, each server accepts only the identities meant to call it, and admin RPCs need the admin
identity."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import grpc
import pytest
import tritonclient.grpc as triton_grpc

from inference_mesh.v1 import cache_pb2, cache_pb2_grpc, mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from tests.conftest import AUTH, EMBEDDER, chat
from tests.integration.test_edge import tls_channel
from tools.stack import LocalStack, StackPorts


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tenants_file) -> Iterator[LocalStack]:
    # Envoy's certificates (public and internal) through SDS, as the chart's Envoy reads them.
    run_dir = tmp_path_factory.mktemp("mtls")
    mesh = LocalStack(run_dir, StackPorts.free(1, gateways=1), tenants_file=tenants_file, internal_tls=True,
                      edge_overrides={"tls_sds_dir": str(run_dir / "envoy-sds")})
    mesh.start()
    yield mesh
    mesh.stop()


def as_identity(stack: LocalStack, identity: str, address: str) -> grpc.Channel:
    return grpc.secure_channel(address, stack.internal_tls_of(identity).channel_credentials())


def test_the_mesh_answers_through_envoy_with_every_internal_hop_on_mtls(secured):
    with tls_channel(secured) as channel:
        edge = mesh_pb2_grpc.InferenceMeshStub(channel)
        request = chat("Name a colour.", max_tokens=6, temperature=0.0)
        first = list(edge.Generate(request, metadata=AUTH, timeout=60))
        again = list(edge.Generate(request, metadata=AUTH, timeout=60))
        embedded = edge.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["a lighthouse"]), metadata=AUTH,
                              timeout=30)
    assert "".join(c.text for c in first) and first[-1].metadata.replica == "triton-cpu-0"
    assert again[-1].metadata.cache_status == mesh_pb2.CACHE_STATUS_EXACT_HIT  # the gateway → cache hop
    assert len(embedded.embeddings) == 1 and len(embedded.embeddings[0].values) == 384


@pytest.mark.parametrize("service", ["gateway", "router", "cache", "retrieval", "ratelimit"])
def test_no_internal_port_answers_plaintext(secured, service):
    address = {"gateway": secured.gateway_address, "router": secured.router_address,
               "cache": secured.cache_address, "retrieval": secured.retrieval_address,
               "ratelimit": secured.ratelimit_address}[service]
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
        router_pb2_grpc.RouterAdminStub(channel).ListReplicas(router_pb2.ListReplicasRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_gateway_reached_around_envoy_refuses(secured):
    request = chat("Name a colour.", max_tokens=4)

    def generate(channel: grpc.Channel) -> grpc.RpcError:
        with channel, pytest.raises(grpc.RpcError) as refused:
            list(mesh_pb2_grpc.InferenceMeshStub(channel).Generate(request, metadata=AUTH, timeout=10))
        return refused.value

    pki = secured.pki
    internal_ca = pki.internal_ca.read_bytes()
    # TLS without a client certificate, or with the public client certificate (another CA): no handshake.
    anonymous = grpc.ssl_channel_credentials(root_certificates=internal_ca)
    public_client = grpc.ssl_channel_credentials(root_certificates=internal_ca,
                                                 private_key=pki.client_key.read_bytes(),
                                                 certificate_chain=pki.client_cert.read_bytes())
    for credentials in (anonymous, public_client):
        assert generate(grpc.secure_channel(secured.gateway_address, credentials)).code() == \
            grpc.StatusCode.UNAVAILABLE
    # A certificate from the internal CA, but not the edge's: refused by the caller policy, with the reason.
    other = generate(as_identity(secured, "cache", secured.gateway_address))
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED and "edge" in other.details()
    # The edge's identity passes the policy, and the gateway still checks the credential itself.
    with as_identity(secured, "edge", secured.gateway_address) as channel:
        gateway = mesh_pb2_grpc.InferenceMeshStub(channel)
        assert list(gateway.Generate(request, metadata=AUTH, timeout=60))[-1].finish_reason
        with pytest.raises(grpc.RpcError) as unknown_key:
            list(gateway.Generate(request, metadata=(("x-api-key", "not-a-key"),), timeout=10))
    assert unknown_key.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_rpcs_need_the_admin_identity(secured):
    with as_identity(secured, "gateway", secured.router_address) as channel:
        router = router_pb2_grpc.RouterAdminStub(channel)
        assert router.ListReplicas(router_pb2.ListReplicasRequest(), timeout=10).replicas  # a read: allowed
        for call, message in ((router.ReloadRegistry, router_pb2.ReloadRequest()),
                              (router.DrainReplica, router_pb2.DrainRequest(replica="triton-cpu-0"))):
            with pytest.raises(grpc.RpcError) as refused:
                call(message, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "mesh-admin" in refused.value.details()
    with as_identity(secured, "gateway", secured.cache_address) as channel, pytest.raises(grpc.RpcError) as refused:
        cache_pb2_grpc.CacheAdminStub(channel).Flush(cache_pb2.FlushRequest(tenant="tenant-a"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with as_identity(secured, "mesh-admin", secured.router_address) as channel:
        assert router_pb2_grpc.RouterAdminStub(channel).ReloadRegistry(router_pb2.ReloadRequest(), timeout=10)
    with as_identity(secured, "mesh-admin", secured.cache_address) as channel:
        cache_pb2_grpc.CacheAdminStub(channel).Flush(cache_pb2.FlushRequest(tenant="tenant-a"), timeout=10)


def test_the_openai_api_rides_mtls_too(secured):
    """Envoy → the gateway's HTTP port on mTLS; around Envoy, only the edge identity gets an answer."""
    import httpx

    body = {"model": EMBEDDER, "input": "a lighthouse", "encoding_format": "float"}
    auth = {"authorization": AUTH[0][1]}
    public = ssl.create_default_context(cafile=str(secured.pki.ca_cert))
    through_edge = httpx.post(f"https://localhost:{secured.ports.edge}/v1/embeddings", json=body, headers=auth,
                              verify=public, timeout=30)
    assert through_edge.status_code == 200 and len(through_edge.json()["data"][0]["embedding"]) == 384

    direct = f"https://127.0.0.1:{secured.ports.gateway_http[0]}/v1/embeddings"

    def internal(identity: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(secured.pki.internal_ca))
        context.check_hostname = False  # the certificate names "gateway", not 127.0.0.1
        if identity:
            tls = secured.internal_tls_of(identity)
            context.load_cert_chain(tls.cert, tls.key)
        return context

    with pytest.raises(httpx.HTTPError):
        httpx.post(direct.replace("https", "http"), json=body, headers=auth, timeout=5)
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.post(direct, json=body, headers=auth, verify=internal(None), timeout=5)
    refused = httpx.post(direct, json=body, headers=auth, verify=internal("cache"), timeout=5)
    assert refused.status_code == 403 and "edge" in refused.json()["error"]["message"]
    assert httpx.post(direct, json=body, headers=auth, verify=internal("edge"), timeout=30).status_code == 200


def test_triton_takes_only_clients_with_an_internal_certificate(secured):
    address = f"127.0.0.1:{secured.ports.tritons[0].grpc}"
    plaintext = triton_grpc.InferenceServerClient(address)
    with pytest.raises(Exception, match=r"(?i)unavailable|connect|handshake|ssl"):
        plaintext.is_server_live(client_timeout=5)
    router = secured.internal_tls_of("router")
    secure = triton_grpc.InferenceServerClient(address, ssl=True, root_certificates=router.ca,
                                               private_key=router.key, certificate_chain=router.cert)
    assert secure.is_server_live(client_timeout=10)

"""The chart's internal certificates against the names its pods really dial: every gRPC hop the rendered chart
configures (a service's *_ADDRESS, the router's Triton pods from the registry's SRV names) is dialled by its name
with the caller's certificate, over a real mTLS handshake with a server presenting the callee's certificate, as made
by tools.kube.internal_pki; Envoy's upstream SAN matchers must find their names in the same certificates; and
cert-manager's Certificates ask for exactly those names. gRPC refuses a certificate that does not name the host it
dialled, which is how the compose certificates failed every hop of a cluster."""

from __future__ import annotations

import base64
from concurrent import futures

import grpc
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.integration.chart import CHART, NAMESPACE, render_chart
from tools.kube.internal_pki import IDENTITIES, dialled_names, secrets
from tools.pki import ensure_pki
from tools.processes import free_port


def _enabled_pools(value_set: str) -> list[str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["pools"]
    for name, pool in yaml.safe_load((CHART / f"values-{value_set}.yaml").read_text())["pools"].items():
        values[name] = {**values[name], **pool}
    return sorted(name for name, pool in values.items() if pool["enabled"])


def grpc_hops(objects: list[dict]) -> set[tuple[str, str, str]]:
    """(caller identity, callee identity, host dialled) of every gRPC hop between the chart's pods."""
    hops = set()
    for workload in objects:
        if workload["kind"] != "Deployment":
            continue
        caller = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"].endswith("_ADDRESS") and env.get("value"):
                    host = env["value"].removeprefix("dns:///").rsplit(":", 1)[0]
                    callee = host.split(".")[0].removeprefix("mesh-").removesuffix("-pods")
                    callee = {"budget": "ratelimit"}.get(callee, callee)
                    hops.add((caller, callee, host))
    registry = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "mesh-registry")
    for name, pool in yaml.safe_load(registry["data"]["registry.yaml"])["pools"].items():
        service = pool["discover"]["srv"].removeprefix("_grpc._tcp.")
        # The SRV answer names each pod (services/router/discovery.py dials it with that name as authority).
        hops.add(("router", "triton", f"triton-{name}-0.{service}"))
    return hops


def envoy_san_matchers() -> set[str]:
    envoy = yaml.safe_load((CHART / "files" / "envoy.yaml").read_text())
    names = set()
    for cluster in envoy["static_resources"]["clusters"]:
        context = cluster.get("transport_socket", {}).get("typed_config", {}).get("common_tls_context", {})
        # Static files: validation_context; through SDS: the combined context's default part holds the matchers.
        validation = context.get("validation_context") or \
            context.get("combined_validation_context", {}).get("default_validation_context", {})
        for matcher in validation.get("match_typed_subject_alt_names", []):
            names.add(matcher["matcher"]["exact"])
    return names


@pytest.fixture(scope="module")
def minted(tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    """Per value set, the Secrets tools.kube.internal_pki makes for its pools, by identity."""
    pki_dir = tmp_path_factory.mktemp("pki")
    return {value_set: {doc["metadata"]["name"].removeprefix("mesh-pki-"): doc
                        for doc in secrets(NAMESPACE, _enabled_pools(value_set), pki_dir=pki_dir)}
            for value_set in ("cpu", "gpu")}


def _files(secret: dict) -> dict[str, bytes]:
    return {name: base64.b64decode(value) for name, value in secret["data"].items()}


def _handshake(server_secret: dict, client_secret: dict, host: str) -> grpc.StatusCode:
    """A real mTLS call: a health server with the callee's certificate, dialled as `host` with the caller's."""
    server_files, client_files = _files(server_secret), _files(client_secret)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials(
        [(server_files["tls.key"], server_files["tls.crt"])], root_certificates=server_files["ca.crt"],
        require_client_auth=True))
    server.start()
    try:
        credentials = grpc.ssl_channel_credentials(client_files["ca.crt"], client_files["tls.key"],
                                                   client_files["tls.crt"])
        options = [("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)]
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK
    finally:
        server.stop(None)


@pytest.mark.parametrize("value_set", ["cpu", "gpu"])
def test_every_grpc_hop_of_the_chart_handshakes_by_the_name_it_dials(minted, value_set):
    hops = grpc_hops(render_chart(value_set))
    assert {callee for _, callee, _ in hops} == {"router", "cache", "retrieval", "ratelimit", "triton"}, hops
    for caller, callee, host in sorted(hops):
        code = _handshake(minted[value_set][callee], minted[value_set][caller], host)
        assert code == grpc.StatusCode.OK, (caller, callee, host, code)


def test_a_certificate_that_does_not_name_the_host_is_refused(minted, tmp_path):
    """The check the test above relies on is real: another identity's certificate, or compose's router
    certificate (named router, router-1.., localhost), fails the handshake for the router's Service name."""
    host = f"mesh-router-pods.{NAMESPACE}.svc.cluster.local"
    own = minted["cpu"]
    assert _handshake(own["cache"], own["gateway"], host) == grpc.StatusCode.UNAVAILABLE
    compose = ensure_pki(tmp_path / "compose-pki")
    compose_router = {"data": {name: base64.b64encode(path.read_bytes()).decode() for name, path in (
        ("tls.crt", compose.internal_cert("router")), ("tls.key", compose.internal_key("router")),
        ("ca.crt", compose.internal_ca))}}
    compose_gateway = {"data": {name: base64.b64encode(path.read_bytes()).decode() for name, path in (
        ("tls.crt", compose.internal_cert("gateway")), ("tls.key", compose.internal_key("gateway")),
        ("ca.crt", compose.internal_ca))}}
    assert _handshake(compose_router, compose_gateway, host) == grpc.StatusCode.UNAVAILABLE
    assert _handshake(compose_router, compose_gateway, "router") == grpc.StatusCode.OK


def test_envoys_upstream_checks_find_their_names_and_the_common_name_is_the_identity(minted):
    for identity, secret in minted["gpu"].items():
        cert = x509.load_pem_x509_certificate(_files(secret)["tls.crt"])
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == identity
    matchers = envoy_san_matchers()
    assert matchers == {"gateway", "ratelimit"}, matchers
    for name in matchers:
        cert = x509.load_pem_x509_certificate(_files(minted["gpu"][name])["tls.crt"])
        assert name in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.DNSName)


def test_cert_managers_certificates_ask_for_the_names_the_tool_signs():
    objects = render_chart("gpu")
    certificates = {o["spec"]["commonName"]: o for o in objects
                    if o["kind"] == "Certificate" and o["metadata"]["name"].startswith("mesh-pki-")}
    assert set(certificates) == set(IDENTITIES)
    mounted = {v["secret"]["secretName"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")
               for v in o["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    for identity, certificate in certificates.items():
        assert certificate["spec"]["dnsNames"] == [*dialled_names(identity, NAMESPACE, _enabled_pools("gpu")),
                                                   "localhost"]
        assert certificate["spec"]["secretName"] in mounted

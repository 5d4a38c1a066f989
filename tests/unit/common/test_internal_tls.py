"""Who may call whom on the internal hops (services/common/internal_tls.py), and when plaintext is allowed."""

from __future__ import annotations

import pytest

from services.common.internal_tls import ADMIN_METHODS, InternalTls, refusal

GENERATE = "/inference_mesh.v1.InferenceMesh/Generate"
INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
RLS = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
CHARGE = "/inference_mesh.v1.TokenBudget/Charge"


@pytest.mark.parametrize(("service", "method", "identity", "allowed"), [
    ("gateway", GENERATE, "edge", True),
    ("gateway", GENERATE, "cache", False),
    ("gateway", GENERATE, None, False),  # plaintext peer on a TLS server cannot happen; the rule still refuses
    ("router", INFER, "gateway", True),
    ("router", INFER, "retrieval", True),
    ("router", INFER, "edge", False),
    ("ratelimit", RLS, "edge", True),
    ("ratelimit", RLS, "gateway", False),
    ("ratelimit", CHARGE, "gateway", True),
    ("ratelimit", CHARGE, "edge", False),  # Envoy decides rate limits; it never spends a tenant's budget
    ("router", "/grpc.health.v1.Health/Check", "triton", True),  # any verified peer may probe health
    ("router", "/inference_mesh.v1.RouterAdmin/ListReplicas", "gateway", True),
    ("unknown-service", GENERATE, "edge", False),
])
def test_callers_per_server_and_method(service, method, identity, allowed):
    assert (refusal(service, method, identity) is None) == allowed


@pytest.mark.parametrize("method", sorted(ADMIN_METHODS))
def test_admin_methods_need_the_admin_identity(method):
    service = "cache" if "Cache" in method else "router"
    for identity in ("gateway", "cache", "retrieval", "edge"):
        assert "mesh-admin" in refusal(service, method, identity)
    assert refusal(service, method, "mesh-admin") is None


def test_certificates_come_together_or_not_at_all():
    with pytest.raises(ValueError, match="together"):
        InternalTls(cert="a.pem")
    assert not InternalTls().enabled and InternalTls(cert="a", key="b", ca="c").enabled


@pytest.mark.parametrize(("address", "refused"), [
    ("127.0.0.1:50051", False), ("localhost:50051", False), ("[::1]:50051", False),
    ("0.0.0.0:50051", True), ("10.0.0.5:50051", True), ("gateway-1:50051", True),
])
def test_plaintext_only_on_loopback_unless_asked_for(address, refused):
    if refused:
        with pytest.raises(ValueError, match="plaintext"):
            InternalTls().check_listen_address(address)
        InternalTls(allow_plaintext=True).check_listen_address(address)
    else:
        InternalTls().check_listen_address(address)

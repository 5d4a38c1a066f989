"""Who may use the admin API (services/admin/gate.py): an admin credential, never a tenant's."""

from __future__ import annotations

import grpc
import pytest

from services.admin.gate import AdminGate
from services.common.errors import MeshError

EDGE = ("x-mesh-edge-secret", "edge-s3cret")


def _refusal(gate: AdminGate, headers, peer=None) -> MeshError:
    with pytest.raises(MeshError) as refused:
        gate.admit(headers, peer)
    return refused.value


def test_the_admin_certificate_and_an_admin_jwt_from_the_edge_are_admitted():
    gate = AdminGate("edge-s3cret")
    assert gate.admit((), "mesh-admin") == "mesh-admin"
    assert gate.admit((EDGE, ("x-mesh-jwt-scope", "openid mesh:admin")), None) == "jwt"


def test_a_scope_header_without_the_edge_secret_is_not_trusted():
    gate = AdminGate("edge-s3cret")
    forged = _refusal(gate, (("x-mesh-jwt-scope", "mesh:admin"),))
    assert forged.code == grpc.StatusCode.UNAUTHENTICATED
    assert _refusal(gate, (("x-mesh-edge-secret", "guess"), ("x-mesh-jwt-scope", "mesh:admin"))).code == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _refusal(AdminGate(""), (("x-mesh-edge-secret", ""), ("x-mesh-jwt-scope", "mesh:admin"))).code == \
        grpc.StatusCode.UNAUTHENTICATED, "no edge secret configured: no header is trusted"


def test_tenant_credentials_are_refused_with_what_to_bring():
    gate = AdminGate("edge-s3cret")
    for headers in ((("authorization", "Bearer mk_tenant"),), (("x-api-key", "mk_tenant"),)):
        refused = _refusal(gate, headers)
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED and "tenant's credential" in refused.message
        assert "mesh:admin" in refused.message
    narrow = _refusal(gate, (EDGE, ("x-mesh-jwt-scope", "mesh:admin:read mesh:adminx")))
    assert narrow.code == grpc.StatusCode.PERMISSION_DENIED, "scopes are whole words"
    assert _refusal(gate, (), "gateway").code == grpc.StatusCode.UNAUTHENTICATED, "another mesh identity"

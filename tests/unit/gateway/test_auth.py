"""Who is calling (services/gateway/auth.py)."""

from __future__ import annotations

from services.common.tenants import Tenant, TenantConfig, Tier, hash_key
from services.gateway.auth import Authenticator


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

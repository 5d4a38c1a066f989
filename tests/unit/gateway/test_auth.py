"""Who is calling (services/gateway/auth.py)."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import MeshError
from services.common.tenants import ApiKey, Tenant, TenantConfig, Tier, hash_key
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


def _table(*tenants: Tenant) -> TenantConfig:
    return TenantConfig(tiers={"standard": Tier(requests_per_minute=300, burst=30)}, tenants=list(tenants))


def test_a_reload_takes_effect_for_the_next_call():
    """The admin directory's poll hands over a new table: a revoked key is refused, a new one accepted."""
    auth = Authenticator(_table(Tenant(id="acme", tier="standard", keys=[ApiKey(sha256=hash_key("old"), id="k1")])))
    assert auth.identify((("x-api-key", "old"),))[0].key_id == "k1"
    auth.reload(_table(Tenant(id="acme", tier="standard", keys=[ApiKey(sha256=hash_key("new"), id="k2")])))
    assert auth.identify((("x-api-key", "old"),)) == (None, "invalid API key"), "remembered across a reload"
    assert auth.identify((("x-api-key", "new"),))[0].key_id == "k2"


def test_an_expired_key_and_a_suspended_tenant_are_refused_with_the_reason():
    now = [1000.0]
    auth = Authenticator(_table(
        Tenant(id="acme", tier="standard", keys=[ApiKey(sha256=hash_key("short"), expires_at=1010.0)]),
        Tenant(id="held", tier="standard", suspended=True, api_key_sha256=[hash_key("held-key")])),
        edge_secret="edge", clock=lambda: now[0])
    assert auth.identify((("x-api-key", "short"),))[0].tenant == "acme"
    now[0] = 1010.0
    caller, problem = auth._identify((("x-api-key", "short"),))
    assert caller is None and "expired at 1970-01-01T00:16:50Z" in problem
    caller, problem = auth._identify((("x-api-key", "held-key"),))
    assert caller is None and "suspended" in problem
    caller, problem = auth._identify((("x-mesh-jwt-tenant", "held"), ("x-mesh-edge-secret", "edge")))
    assert caller is None and "suspended" in problem, "a JWT does not get round a suspension"


def test_a_key_limited_to_models_may_use_only_those():
    auth = Authenticator(_table(Tenant(id="acme", tier="standard", keys=[
        ApiKey(sha256=hash_key("narrow"), allowed_models=["small"]), ApiKey(sha256=hash_key("wide"))])))
    narrow = auth.identify((("x-api-key", "narrow"),))[0]
    narrow.may_use("small")
    with pytest.raises(MeshError) as refused:
        narrow.may_use("large")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED and "small" in refused.value.message
    auth.identify((("x-api-key", "wide"),))[0].may_use("large")


def test_queued_work_runs_as_its_key_stands_now():
    """A batch's lines run as the key that created it: revoked, expired or suspended since, they do not run."""
    now = [1000.0]
    table = _table(Tenant(id="acme", tier="standard", keys=[
        ApiKey(id="key_a", sha256=hash_key("a"), allowed_models=["small"]),
        ApiKey(id="key_b", sha256=hash_key("b"), expires_at=1010.0)]),
        Tenant(id="other", tier="standard", keys=[ApiKey(id="key_o", sha256=hash_key("o"))]))
    auth = Authenticator(table, clock=lambda: now[0])
    caller, _ = auth.caller_for("acme", "key_a")
    assert (caller.tenant, caller.key_id, caller.allowed_models) == ("acme", "key_a", frozenset({"small"}))
    assert auth.caller_for("acme", "")[0].tenant == "acme", "work a JWT queued runs as its tenant"
    assert auth.caller_for("acme", "key_o") == (None, "the API key that created this batch (key_o) was revoked"), \
        "another tenant's key id is no key of this tenant"
    now[0] = 1010.0
    assert "expired" in auth.caller_for("acme", "key_b")[1]
    auth.reload(_table(Tenant(id="acme", tier="standard", suspended=True, keys=[
        ApiKey(id="key_a", sha256=hash_key("a"))])))
    assert "suspended" in auth.caller_for("acme", "key_a")[1]
    auth.reload(_table(Tenant(id="acme", tier="standard")))
    assert "revoked" in auth.caller_for("acme", "key_a")[1]

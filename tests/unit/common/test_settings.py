"""Settings facts that depend on each other are derived, and shared fields are declared once."""

from __future__ import annotations

import importlib
import inspect

import pytest

from services.cache.settings import CacheSettings
from services.common.settings import RouterClientSettings
from services.gateway.settings import GatewaySettings
from services.retrieval.settings import RetrievalSettings


def test_a_gateways_cache_lookup_outlasts_the_caches_stampede_wait():
    # A lookup shorter than the wait would give up on an answer about to arrive and generate it again.
    assert GatewaySettings().cache_lookup_timeout_s > CacheSettings().stampede_wait_s


def test_the_router_client_fields_are_declared_once():
    for settings in (GatewaySettings, CacheSettings, RetrievalSettings):
        assert issubclass(settings, RouterClientSettings)
        own = inspect.get_annotations(settings)
        assert "router_address" not in own and "model_refresh_s" not in own, settings.__name__


def test_the_edges_timeouts_outlast_the_gateways_they_front():
    # A shorter route timeout would answer Envoy's bare 504 where the gateway has a precise status to give.
    from services.edge.settings import EdgeSettings

    edge, gateway = EdgeSettings(), GatewaySettings()
    assert edge.inference_timeout_s > gateway.generate_timeout_s
    assert edge.ingest_timeout_s >= gateway.ingest_timeout_s
    assert edge.limits.request_timeout_s > gateway.ingest_timeout_s
    assert edge.metadata_timeout_s >= gateway.metadata_timeout_s


@pytest.mark.parametrize(("module", "name", "prefix"), [
    ("services.gateway.settings", "GatewaySettings", "MESH_GATEWAY_"),
    ("services.router.settings", "RouterSettings", "MESH_ROUTER_"),
    ("services.cache.settings", "CacheSettings", "MESH_CACHE_"),
    ("services.retrieval.settings", "RetrievalSettings", "MESH_RETRIEVAL_"),
    ("services.ratelimit.settings", "RateLimitSettings", "MESH_RATELIMIT_"),
    ("services.edge.settings", "EdgeSettings", "MESH_EDGE_"),
])
def test_every_service_reads_nested_settings_from_its_environment(monkeypatch, tmp_path, module, name, prefix):
    # Internal mTLS arrives this way (MESH_CACHE_TLS__CERT ...): a settings class that lost the "__" delimiter
    # would start in plaintext and every call to an mTLS router would fail.
    monkeypatch.setenv(f"{prefix}RESILIENCE__MAX_RETRIES", "1")
    for part in ("cert", "key", "ca"):
        (tmp_path / f"{part}.pem").write_text("-")
        monkeypatch.setenv(f"{prefix}TLS__{part.upper()}", str(tmp_path / f"{part}.pem"))
    settings = getattr(importlib.import_module(module), name)()
    assert settings.resilience.max_retries == 1 and str(settings.tls.cert) == str(tmp_path / "cert.pem")

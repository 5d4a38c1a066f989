"""Settings facts that depend on each other are derived, and shared fields are declared once."""

from __future__ import annotations

import inspect

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

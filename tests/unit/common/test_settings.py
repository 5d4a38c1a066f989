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

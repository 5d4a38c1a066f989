"""Pure unit tests for the hardening: bounded router memory, the single-credential rule, the
edge's limits as rendered."""

from __future__ import annotations

import tracemalloc

import pytest

from services.edge.render import render
from services.edge.settings import EdgeSettings
from services.gateway.credentials import CredentialError, single_credential
from services.router.balancer import KeyHomes


class _Replica:
    def __init__(self, name: str) -> None:
        self.name = name


def test_router_affinity_memory_stays_flat_under_100k_distinct_long_sessions():
    homes = KeyHomes(idle_s=600, max_keys=1_000)
    replicas = [_Replica("r0"), _Replica("r1")]
    for i in range(1_000):
        homes.home(f"warm-{i}", replicas)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(100_000):
        homes.home(f"session-{i}-" + "x" * 1_000, replicas)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(homes._homes) <= 1_001
    # 100,000 keys of 1 KB would be ~100 MB if kept; the bound keeps it to noise.
    assert grown < 2_000_000, grown


@pytest.mark.parametrize(("metadata", "problem"), [
    ((), "missing credentials"),
    ((("x-api-key", "a"), ("x-api-key", "b")), "exactly one credential"),
    ((("X-Api-Key", "a"), ("authorization", "Bearer b")), "exactly one credential"),
    ((("authorization", "Basic abc"),), "Bearer"),
    ((("x-api-key", "a,b"),), "no single credential"),
    ((("x-api-key", "k" * 9_000),), "at most"),
])
def test_single_credential_refuses_ambiguity(metadata, problem):
    with pytest.raises(CredentialError, match=problem):
        single_credential(metadata)


def test_single_credential_reads_either_header():
    assert single_credential((("authorization", "bearer  key-1 "),)).token == "key-1"
    assert single_credential((("x-api-key", "key-2"), ("x-other", "v"))).token == "key-2"


def test_the_edge_renders_envoys_edge_best_practices():
    config = render(EdgeSettings())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert render(EdgeSettings(host="0.0.0.0"))["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    public = config["static_resources"]["listeners"][0]
    manager = public["filter_chains"][0]["filters"][0]["typed_config"]
    h2 = manager["http2_protocol_options"]
    assert (h2["max_concurrent_streams"], h2["initial_stream_window_size"], h2["initial_connection_window_size"]) \
        == (100, 65_536, 1_048_576)
    assert manager["common_http_protocol_options"]["headers_with_underscores_action"] == "DROP_HEADER"
    assert manager["normalize_path"] and manager["merge_slashes"] and manager["request_headers_timeout"]
    assert public["per_connection_buffer_limit_bytes"] == 32_768
    assert {m["name"] for m in config["overload_manager"]["resource_monitors"]} == {
        "envoy.resource_monitors.fixed_heap", "envoy.resource_monitors.global_downstream_max_connections"}
    shield = next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.local_ratelimit")
    assert shield["typed_config"]["local_rate_limit_per_downstream_connection"] is True
    first_routes = manager["route_config"]["virtual_hosts"][0]["routes"][:3]
    assert all(r["direct_response"]["status"] == 401 for r in first_routes)


@pytest.mark.parametrize("value", ["mesh-dev-key\xa0", "\u2003mesh-dev-key", "mesh\x00dev-key", "mesh dev-key",
                                   "Bearer mesh-dev-key\xa0", "mesh-dev-kéy"])
def test_a_credential_outside_visible_ascii_is_refused_never_trimmed(value):
    header = "authorization" if value.startswith("Bearer") else "x-api-key"
    with pytest.raises(CredentialError, match="visible ASCII"):
        single_credential([(header, value)])


def test_a_visible_ascii_credential_is_read_as_sent():
    assert single_credential([("x-api-key", "mesh-dev-key")]).token == "mesh-dev-key"
    assert single_credential([("authorization", "Bearer abc.def-ghi_jkl")]).token == "abc.def-ghi_jkl"

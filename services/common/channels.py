"""Channels between the mesh's processes: one set of options (message size, keepalive) for every hop, and mTLS
when the process has an internal certificate."""

from __future__ import annotations

import grpc

from services.common.internal_tls import InternalTls
from services.common.telemetry import client_interceptors

# The same on every hop, and above the largest public request: an Embed batch of 256 texts of 8,192 characters
# (8 MiB in UTF-8 at worst) or a 1,000,000-character document. Larger messages get RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Clients ping an idle connection this often, so a dead peer (a killed replica, a dropped NAT entry) is noticed
# in seconds rather than at the next call's deadline.
KEEPALIVE_PING_MS = 20_000
# A server must accept those pings: gRPC's default (one ping per 5 minutes without data, two strikes) answers
# them with GOAWAY too_many_pings and closes the connection under the calls in flight. Triton gets the same
# bound (tools/triton.py, compose).
MIN_PING_INTERVAL_MS = KEEPALIVE_PING_MS // 2
# A peer that went away is dialled again within this long once it is back (gRPC's default backoff grows to two
# minutes: a cache or router restarted after 20 s down would be ignored for several seconds more, its breaker
# held open). Redialling a dead loopback or cluster address every two seconds costs nothing.
MAX_RECONNECT_BACKOFF_MS = 2_000
# A target that resolves to several addresses (a headless Service's A records in Kubernetes, an ipv4: list) gets
# every call balanced over all of them: gRPC's default, pick_first, pins a client to one pod for the connection's
# life, so gateways behind one ClusterIP each loaded a single router.
LOAD_BALANCING_POLICY = "round_robin"
# Servers close each connection after this long (in-flight calls finish: the grace is unbounded), so clients
# resolve the target again and reach replicas added since they connected.
MAX_CONNECTION_AGE_MS = 300_000
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.lb_policy_name", LOAD_BALANCING_POLICY),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_PING_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
]


def channel(target: str, tls: InternalTls | None = None, authority: str = "") -> grpc.aio.Channel:
    """A channel to another mesh process: mTLS with this process's certificate when `tls` has one. authority:
    the peer's name when `target` is its address (a replica found in DNS): its certificate is checked against it."""
    interceptors = client_interceptors() or None
    options = list(CHANNEL_OPTIONS)
    if authority:
        options += [("grpc.default_authority", authority), ("grpc.ssl_target_name_override", authority)]
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

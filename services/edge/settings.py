"""The edge (Envoy) settings: the rendered Envoy config comes from these and nothing else."""

from __future__ import annotations

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.common.deadlines import GENERATION_BUDGET_S, INGEST_BUDGET_S, METADATA_BUDGET_S
from services.common.settings import ServiceSettings


class LocalShield(BaseModel, extra="forbid"):
    """Envoy's own token bucket, per Envoy process, ahead of any call to the rate-limit service: it caps what a
    flood (keyless traffic included) can cost before the per-tenant limits are even asked."""

    max_tokens: int = 2000
    tokens_per_fill: int = 1000
    fill_interval_s: float = 1.0


class EdgeLimits(BaseModel, extra="forbid"):
    """What one client may make Envoy hold (Envoy's edge best practices, with its recommended values)."""

    max_concurrent_streams: int = 100
    stream_window_bytes: int = 64 * 1024
    connection_window_bytes: int = 1024 * 1024
    connection_buffer_bytes: int = 32 * 1024
    max_request_headers_kb: int = 60
    max_headers_count: int = 100
    request_headers_timeout_s: float = 10.0
    # The whole request, body included, must arrive within this (408 after): the longest legitimate upload is an
    # ingest stream, bounded by its own route timeout. A response that has started disarms it.
    request_timeout_s: float = INGEST_BUDGET_S + 10.0
    # A stream with no bytes either way for this long is reset; generation streams send a token at least
    # every few seconds, ingest streams a batch.
    stream_idle_timeout_s: float = 300.0
    connection_idle_timeout_s: float = 900.0
    # An HTTP API body is received whole by Envoy before a gateway sees the request: a client that dribbles its
    # body holds Envoy's buffer (bounded here), never one of a gateway's slots. The gateway's own limit.
    http_body_max_bytes: int = 8 * 1024 * 1024
    max_heap_bytes: int = 1024 * 1024 * 1024
    max_connections: int = 10_000


class EdgeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_EDGE_", env_nested_delimiter="__", extra="forbid")

    port: int = 8443
    # The admin interface (stats, config dump, and endpoints that change state) listens on loopback only.
    admin_port: int = 9901
    # A listener that serves only GET /stats/prometheus (from the admin interface) for Prometheus; 0: none.
    metrics_port: int = 9902
    metrics_host: str = "127.0.0.1"
    limits: EdgeLimits = EdgeLimits()
    # Gateway replicas behind the edge (least_request over all of them).
    gateways: list[str] = Field(default_factory=lambda: ["127.0.0.1:50051", "127.0.0.1:50061"])
    # Their OpenAI-compatible HTTP ports: /v1/* on the public listener goes there. Empty: no HTTP API.
    gateways_http: list[str] = Field(default_factory=lambda: ["127.0.0.1:8080", "127.0.0.1:8090"])
    ratelimit_address: str = "127.0.0.1:50055"
    ratelimit_domain: str = "inference-mesh"
    # Envoy's wait for a rate-limit answer, then the failure mode applies. Closed by default: an error is a deny
    # (UNAVAILABLE; over HTTP 503 with retry-after), counted in Envoy's ratelimit.error stat. Open would let any
    # request that makes the rate-limit service fail pass unlimited (a credential byte did, issue 30); set it
    # only to trade that for availability, counted in ratelimit.failure_mode_allowed.
    ratelimit_timeout_s: float = 0.25
    ratelimit_fail_open: bool = False
    # Off: no call to the rate-limit service (the local shield and the gateways' token budgets remain).
    global_rate_limit: bool = True
    shield: LocalShield = LocalShield()

    tls_cert: str = "run/pki/server.pem"
    tls_key: str = "run/pki/server-key.pem"
    # mTLS: clients must present a certificate signed by this CA.
    require_client_cert: bool = False
    client_ca: str = "run/pki/ca.pem"
    # Every certificate Envoy holds (public, client CA, its internal identity and CA) through SDS, one file per
    # secret in this directory (render_sds gives them; Envoy takes one secret a file): Envoy watches each
    # certificate's directory and uses a renewed certificate (cert-manager, a replaced Secret) on new connections
    # without a restart. Empty: the files are read once, at start.
    tls_sds_dir: str = ""

    jwks_file: str = "run/pki/jwks.json"
    jwt_issuer: str = "https://inference-mesh.local"
    jwt_audience: str = "inference-mesh"
    jwt_tenant_claim: str = "tenant"
    # Sent to the gateways with every request; a gateway trusts a JWT tenant header only with it.
    edge_secret: str = ""

    # A route outlives the gateway's own deadline by a second, so the caller gets the gateway's precise
    # DEADLINE_EXCEEDED rather than Envoy's bare 504; metadata calls are cheap and must fail fast.
    inference_timeout_s: float = GENERATION_BUDGET_S + 1.0
    metadata_timeout_s: float = METADATA_BUDGET_S
    ingest_timeout_s: float = INGEST_BUDGET_S
    # A hard cap on any stream's life, whatever the route.
    max_stream_duration_s: float = 900.0
    # A dead gateway leaves rotation within two intervals (outlier detection reacts sooner on failed calls).
    health_check_interval_s: float = 10.0
    # host:port of an OTLP gRPC collector: Envoy starts each request's trace there (W3C traceparent to the
    # gateways). Empty: no tracing.
    otlp_address: str = ""
    trace_sampling_percent: float = Field(default=100.0, ge=0, le=100)
    concurrency: int = 2

"""Renders the Envoy config (a dict, dumped as YAML) from EdgeSettings.

Routes by gRPC method class: streaming inference (no retries once a gateway has the request), unary inference
(retried on UNAVAILABLE on another gateway), metadata (short timeouts), health and reflection (no limits).
"""

from __future__ import annotations

import ipaddress
import posixpath
from pathlib import Path
from typing import Any

import yaml

from services.common.wire import (
    CREDENTIAL_HEADERS,
    DESCRIPTOR_API_KEY,
    DESCRIPTOR_AUTHORIZATION,
    DESCRIPTOR_TENANT,
    EDGE_SECRET_HEADER,
    JWT_SCOPE_HEADER,
    JWT_TENANT_HEADER,
)
from services.edge.settings import EdgeSettings

MESH = "/inference_mesh.v1.InferenceMesh/"
KSERVE = "/inference.GRPCInferenceService/"
STREAMING = [MESH + "Generate", MESH + "Ask", KSERVE + "ModelStreamInfer"]
# The Files and Batches API over gRPC: files stream in and out in chunks (an ingest's time), the rest are metadata
# calls. None is retried once a gateway saw it: an upload, a create or a cancel is a write.
BATCHES = "/inference_mesh.v1.Batches/"
INGEST = [MESH + "UpsertDocuments", BATCHES + "UploadFile", BATCHES + "GetFileContent"]
OPENAI_PREFIX = "/v1/"
# The admin API (services/admin): gRPC and JSON over HTTP. An admin has no tenant bucket: not rate-limited per
# tenant (the per-connection shield still applies), and never retried once a gateway saw it (a create is a write).
ADMIN_GRPC = "/inference_mesh.v1.Admin/"
ADMIN_HTTP_PREFIX = "/admin/"  # the API (/admin/v1/) and its console (/admin/console)
UNARY_INFERENCE = [MESH + "Embed", MESH + "Search", MESH + "DeleteDocuments", KSERVE + "ModelInfer"]


BUFFER = "envoy.filters.http.buffer"


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{kind}", **fields}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _socket(address: str) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    return {"socket_address": {"address": host, "port_value": int(port)}}


SDS_CERTIFICATE = "edge_certificate"
SDS_CLIENT_CA = "edge_client_ca"
SDS_INTERNAL_CERTIFICATE = "edge_internal_certificate"
SDS_INTERNAL_CA = "edge_internal_ca"


def _sds(s: EdgeSettings, name: str) -> dict[str, Any]:
    # The SDS file's directory is watched too: a ConfigMap update swaps it the same way a Secret's is.
    return {"name": name, "sds_config": {"resource_api_version": "V3", "path_config_source": {
        "path": posixpath.join(s.tls_sds_dir, f"{name}.yaml"), "watched_directory": {"path": s.tls_sds_dir}}}}


def _certificate_secret(name: str, cert: str, key: str) -> dict[str, Any]:
    return {"name": name, "tls_certificate": {"certificate_chain": {"filename": cert}, "private_key": {"filename": key},
                                              "watched_directory": {"path": posixpath.dirname(cert)}}}


def _ca_secret(name: str, ca: str) -> dict[str, Any]:
    return {"name": name, "validation_context": {"trusted_ca": {"filename": ca},
                                                 "watched_directory": {"path": posixpath.dirname(ca)}}}


def render_sds(s: EdgeSettings) -> dict[str, dict[str, Any]]:
    """The files of tls_sds_dir, by file name: one secret each (Envoy refuses a file with several), naming the
    certificate files, each reloaded when its directory's contents are swapped (how Kubernetes updates a mounted
    Secret, and how cert-manager's renewals arrive). Envoy reads a certificate and its key together and checks
    they did not change between the two reads."""
    secrets = [_certificate_secret(SDS_CERTIFICATE, s.tls_cert, s.tls_key)]
    if s.require_client_cert:
        secrets.append(_ca_secret(SDS_CLIENT_CA, s.client_ca))
    if s.tls.enabled:  # the edge's internal identity toward the gateways and rate limits
        secrets += [_certificate_secret(SDS_INTERNAL_CERTIFICATE, s.tls.cert, s.tls.key),
                    _ca_secret(SDS_INTERNAL_CA, s.tls.ca)]
    kind = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    return {f"{secret['name']}.yaml": {"resources": [{"@type": kind, **secret}]} for secret in secrets}


def write_sds(s: EdgeSettings, directory: Path, header: str = "") -> None:
    """render_sds's files, written into `directory` (tls_sds_dir where Envoy runs, or the chart's files/sds)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in render_sds(s).items():
        (directory / name).write_text(header + yaml.safe_dump(content, sort_keys=False))


def _tls_context(s: EdgeSettings) -> dict[str, Any]:
    common: dict[str, Any] = {
        # gRPC needs h2; OpenAI clients (httpx, curl) mostly speak HTTP/1.1.
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
    }
    if s.tls_sds_dir:
        common["tls_certificate_sds_secret_configs"] = [_sds(s, SDS_CERTIFICATE)]
    else:
        common["tls_certificates"] = [{"certificate_chain": {"filename": s.tls_cert},
                                       "private_key": {"filename": s.tls_key}}]
    context: dict[str, Any] = {"common_tls_context": common}
    if s.require_client_cert:
        if s.tls_sds_dir:
            common["validation_context_sds_secret_config"] = _sds(s, SDS_CLIENT_CA)
        else:
            common["validation_context"] = {"trusted_ca": {"filename": s.client_ca}}
        context["require_client_certificate"] = True
    return _typed("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", **context)


def _rate_limits() -> list[dict[str, Any]]:
    # One descriptor per way a tenant can be named; the rate-limit service counts a request once per tenant.
    return [{"actions": [{"request_headers": {"header_name": header, "descriptor_key": key}}]}
            for header, key in ((JWT_TENANT_HEADER, DESCRIPTOR_TENANT), ("x-api-key", DESCRIPTOR_API_KEY),
                                ("authorization", DESCRIPTOR_AUTHORIZATION))]


_PREVIOUS_HOSTS = {"name": "envoy.retry_host_predicates.previous_hosts",
                   "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate")}


def _retry(retry_on: str) -> dict[str, Any]:
    return {"retry_on": retry_on, "num_retries": 2, "retry_host_predicate": [_PREVIOUS_HOSTS],
            "host_selection_retry_max_attempts": 3,
            "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"}}


def _route(match: dict[str, Any], timeout_s: float, retry_on: str, limited: bool) -> dict[str, Any]:
    action: dict[str, Any] = {
        "cluster": "gateways",
        "timeout": _seconds(timeout_s),
        # A shorter grpc-timeout from the caller wins; a longer one is capped at the route's.
        "max_stream_duration": {"grpc_timeout_header_max": _seconds(timeout_s)},
        "retry_policy": _retry(retry_on),
    }
    if limited:
        action["rate_limits"] = _rate_limits()
    # gRPC streams flow through as they come (the buffer is for the HTTP API's bodies).
    return {"match": {**match, "grpc": {}}, "route": action, "typed_per_filter_config": {
        BUFFER: _typed("envoy.extensions.filters.http.buffer.v3.BufferPerRoute", disabled=True)}}


def _openai_route(s: EdgeSettings, limited: bool) -> dict[str, Any]:
    """The OpenAI-compatible API (services/gateway/openai_http): retried only where no gateway saw the request,
    since a POST that reached one may have started a generation."""
    action: dict[str, Any] = {"cluster": "gateways_http", "timeout": _seconds(s.inference_timeout_s),
                              "retry_policy": _retry("connect-failure,refused-stream")}
    if limited:
        action["rate_limits"] = _rate_limits()
    return {"match": {"prefix": OPENAI_PREFIX}, "route": action}


def _refusal(headers: list[dict[str, Any]], message: str) -> dict[str, Any]:
    # 401 becomes UNAUTHENTICATED for gRPC callers and the body their grpc-message. Answered by the route,
    # so a refused request never reaches the rate-limit service or a gateway.
    return {"match": {"prefix": "/", "headers": headers},
            "direct_response": {"status": 401, "body": {"inline_string": message}}}


# Envoy matches a header regex against the whole value. authorization is "Bearer <token>": one space.
VISIBLE_CREDENTIAL = {"authorization": r"[\x21-\x7e]+ [\x21-\x7e]+", "x-api-key": r"[\x21-\x7e]+"}


def _credential_routes() -> list[dict[str, Any]]:
    """One credential per request. The rate-limit service and the gateway each read the credential: with two
    (a repeated header, or a key beside a JWT) they could read different ones and disagree on the tenant.
    Envoy joins a repeated header's values with commas before matching; keys and JWTs contain none."""
    present = {"present_match": True}
    repeated = {"string_match": {"contains": ","}}
    return [
        _refusal([{"name": CREDENTIAL_HEADERS[0], **present}, {"name": CREDENTIAL_HEADERS[1], **present}],
                 f"send exactly one credential: both {CREDENTIAL_HEADERS[0]!r} and {CREDENTIAL_HEADERS[1]!r} "
                 "were sent"),
        *(_refusal([{"name": header, **repeated}],
                   f"send exactly one credential: {header!r} was sent more than once (or holds a comma)")
          for header in CREDENTIAL_HEADERS),
        # A byte the rate-limit service cannot put in a descriptor made its call fail (and the filter fail open)
        # while a lenient reader behind accepted the key: such a credential is refused here, before either.
        *(_refusal([{"name": header, "string_match": {"safe_regex": {"regex": pattern}}, "invert_match": True}],
                   f"{header!r} must be visible ASCII characters only (a key or a JWT)")
          for header, pattern in VISIBLE_CREDENTIAL.items()),
    ]


def _routes(s: EdgeSettings) -> list[dict[str, Any]]:
    # Streams are retried only where the gateway never saw them (connect failure, refused stream): a retry
    # after tokens went out would duplicate them. Unary calls are retried on UNAVAILABLE too.
    never_reached = "connect-failure,refused-stream"
    unary = "unavailable,connect-failure,refused-stream,reset"
    limited = s.global_rate_limit
    routes = _credential_routes()
    if s.gateways_http:
        routes.append(_openai_route(s, limited))
        routes.append({"match": {"prefix": ADMIN_HTTP_PREFIX}, "route": {
            "cluster": "gateways_http", "timeout": _seconds(s.metadata_timeout_s),
            "retry_policy": _retry(never_reached)}})
    routes.append(_route({"prefix": ADMIN_GRPC}, s.metadata_timeout_s, never_reached, limited=False))
    routes += [_route({"path": p}, s.inference_timeout_s, never_reached, limited) for p in STREAMING]
    routes += [_route({"path": p}, s.ingest_timeout_s, never_reached, limited) for p in INGEST]
    routes += [_route({"path": p}, s.inference_timeout_s, unary, limited) for p in UNARY_INFERENCE]
    routes.append(_route({"prefix": BATCHES}, s.metadata_timeout_s, never_reached, limited))
    routes += [_route({"prefix": prefix}, s.metadata_timeout_s, unary, limited) for prefix in (MESH, KSERVE)]
    routes += [_route({"prefix": "/grpc.health.v1.Health/"}, s.metadata_timeout_s, unary, limited=False),
               _route({"prefix": "/grpc.reflection."}, s.metadata_timeout_s * 2, never_reached, limited=False)]
    return routes


def _http_filters(s: EdgeSettings) -> list[dict[str, Any]]:
    always = {"numerator": 100, "denominator": "HUNDRED"}
    provider = {
        "issuer": s.jwt_issuer,
        "audiences": [s.jwt_audience],
        "local_jwks": {"filename": s.jwks_file},
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": False,
        "claim_to_headers": [{"header_name": JWT_TENANT_HEADER, "claim_name": s.jwt_tenant_claim},
                             {"header_name": JWT_SCOPE_HEADER, "claim_name": "scope"}],
    }
    filters = [
        # Identity headers come from Envoy only: drop whatever a client sent under those names first.
        {"name": "envoy.filters.http.header_mutation", "typed_config": _typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [{"remove": JWT_TENANT_HEADER}, {"remove": JWT_SCOPE_HEADER},
                                             {"remove": EDGE_SECRET_HEADER}]})},
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": _typed(
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            stat_prefix="edge_shield",
            # Per downstream connection, so one tenant's flood spends its own connection's bucket and never
            # gets other tenants' requests refused; the per-tenant limits behind it are the global ones.
            local_rate_limit_per_downstream_connection=True,
            token_bucket={"max_tokens": s.shield.max_tokens, "tokens_per_fill": s.shield.tokens_per_fill,
                          "fill_interval": _seconds(s.shield.fill_interval_s)},
            filter_enabled={"runtime_key": "edge_shield_enabled", "default_value": always},
            filter_enforced={"runtime_key": "edge_shield_enforced", "default_value": always},
            rate_limited_as_resource_exhausted=True,
            response_headers_to_add=[{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                      "header": {"key": "retry-after", "value": "1"}}])},
        # A bearer token that looks like a JWT (base64 of '{"') must verify; anything else is an API key, which
        # the gateway checks.
        {"name": "envoy.filters.http.jwt_authn", "typed_config": _typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={"mesh": provider},
            rules=[{"match": {"prefix": "/", "headers": [{
                        "name": "authorization",
                        "string_match": {"prefix": "Bearer eyJ", "ignore_case": True}}]},
                    "requires": {"provider_name": "mesh"}}])},
        {"name": "envoy.filters.http.ratelimit", "typed_config": _typed(
            "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            domain=s.ratelimit_domain,
            timeout=_seconds(s.ratelimit_timeout_s),
            failure_mode_deny=not s.ratelimit_fail_open,
            # Fail closed answers UNAVAILABLE (retry later), not Envoy's default 500 (INTERNAL, looks like a bug).
            status_on_error={"code": "ServiceUnavailable"},
            rate_limited_as_resource_exhausted=True,
            enable_x_ratelimit_headers="DRAFT_VERSION_03",
            rate_limit_service={"transport_api_version": "V3",
                                "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"},
                                                 "timeout": _seconds(s.ratelimit_timeout_s)}})},
        # The HTTP API's bodies are received whole here before a gateway is picked (gRPC routes turn it off).
        {"name": BUFFER, "typed_config": _typed("envoy.extensions.filters.http.buffer.v3.Buffer",
                                                max_request_bytes=s.limits.http_body_max_bytes)},
        {"name": "envoy.filters.http.router",
         "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")},
    ]
    if not s.global_rate_limit:
        filters = [f for f in filters if f["name"] != "envoy.filters.http.ratelimit"]
    if not s.gateways_http:
        filters = [f for f in filters if f["name"] != BUFFER]
    return filters


# What Envoy answers itself on the OpenAI routes (refused credentials, rate limits, no healthy gateway, route
# timeouts) in OpenAI's error shape, as the gateways answer theirs (services/gateway/openai_http/errors.py).
_OPENAI_LOCAL_ERRORS = ((401, "authentication_error", "invalid_api_key"), (403, "permission_error", "forbidden"),
                        (408, "invalid_request_error", "request_timeout"),
                        (413, "invalid_request_error", "request_too_large"),
                        (429, "rate_limit_error", "rate_limit_exceeded"), (503, "server_error", "service_unavailable"),
                        (504, "server_error", "timeout"), (None, "server_error", "edge_error"))


def _openai_local_replies() -> dict[str, Any]:
    on_openai_path = {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": OPENAI_PREFIX}}}}
    mappers = []
    for status, kind, code in _OPENAI_LOCAL_ERRORS:
        match = on_openai_path if status is None else {"and_filter": {"filters": [
            on_openai_path, {"status_code_filter": {"comparison": {
                "op": "EQ", "value": {"default_value": status, "runtime_key": f"openai_local_reply_{status}"}}}}]}}
        mapper = {"filter": match, "body_format_override": {
            "json_format": {"error": {"message": "%LOCAL_REPLY_BODY%", "type": kind, "param": None, "code": code}},
            "content_type": "application/json"}}
        if status == 503:
            # No gateway, or the rate-limit service could not decide: a retry after a short wait may pass.
            mapper["headers_to_add"] = [{"header": {"key": "retry-after", "value": "1"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
        mappers.append(mapper)
    return {"mappers": mappers}


def _listener(s: EdgeSettings) -> dict[str, Any]:
    manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="edge",
        codec_type="AUTO",
        use_remote_address=True,
        # Envoy's edge best practices: small windows and few streams per connection bound what one client
        # can make Envoy buffer; headers with underscores are dropped and escaped slashes refused, never guessed.
        http2_protocol_options={"max_concurrent_streams": s.limits.max_concurrent_streams,
                                "initial_stream_window_size": s.limits.stream_window_bytes,
                                "initial_connection_window_size": s.limits.connection_window_bytes},
        common_http_protocol_options={"max_stream_duration": _seconds(s.max_stream_duration_s),
                                      "idle_timeout": _seconds(s.limits.connection_idle_timeout_s),
                                      # Dropped, not refused: no upstream ever sees x_mesh_tenant for
                                      # x-mesh-tenant either way, and a refusal is the HTTP/1 codec's own plain
                                      # "Bad Request", which local_reply_config cannot put in OpenAI's shape
                                      # (found by the OpenAPI fuzz).
                                      "headers_with_underscores_action": "DROP_HEADER",
                                      "max_headers_count": s.limits.max_headers_count},
        max_request_headers_kb=s.limits.max_request_headers_kb,
        request_headers_timeout=_seconds(s.limits.request_headers_timeout_s),
        request_timeout=_seconds(s.limits.request_timeout_s),
        stream_idle_timeout=_seconds(s.limits.stream_idle_timeout_s),
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="REJECT_REQUEST",
        route_config={"name": "mesh", "virtual_hosts": [{
            "name": "mesh", "domains": ["*"], "routes": _routes(s),
            "request_headers_to_add": [{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                        "header": {"key": EDGE_SECRET_HEADER, "value": s.edge_secret}}],
        }]},
        http_filters=_http_filters(s),
    )
    if s.gateways_http:
        manager["local_reply_config"] = _openai_local_replies()
    if s.otlp_address:
        manager["tracing"] = _tracing(s)
    return {"name": "public", "address": _socket(f"{s.host}:{s.port}"),
            "per_connection_buffer_limit_bytes": s.limits.connection_buffer_bytes,
            "filter_chains": [{"transport_socket": {"name": "envoy.transport_sockets.tls",
                                                    "typed_config": _tls_context(s)},
                               "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}]}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
        return True
    except ValueError:
        return False


def _http2_cluster(name: str, addresses: list[str], connect_timeout_s: float) -> dict[str, Any]:
    return {
        "name": name,
        # Host names (docker compose services, Kubernetes services) are resolved and re-resolved by Envoy.
        "type": "STATIC" if all(_is_ip(a) for a in addresses) else "STRICT_DNS",
        "connect_timeout": _seconds(connect_timeout_s),
        "per_connection_buffer_limit_bytes": 1024 * 1024,
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {"max_concurrent_streams": 1024}})},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(address)}} for address in addresses]}]},
    }


def _openai_cluster(s: EdgeSettings, grpc_gateways: dict[str, Any]) -> dict[str, Any]:
    """The gateways' HTTP ports (HTTP/1.1: aiohttp), balanced, checked and ejected like their gRPC ports."""
    cluster = {key: value for key, value in grpc_gateways.items()
               if key in ("lb_policy", "least_request_lb_config", "outlier_detection", "circuit_breakers")}
    interval = _seconds(s.health_check_interval_s)
    cluster.update({
        "name": "gateways_http",
        "type": "STATIC" if all(_is_ip(a) for a in s.gateways_http) else "STRICT_DNS",
        "connect_timeout": "1s",
        "per_connection_buffer_limit_bytes": 1024 * 1024,
        "health_checks": [{"timeout": "2s", "interval": interval, "no_traffic_interval": interval,
                           "unhealthy_threshold": 2, "healthy_threshold": 1,
                           "http_health_check": {"path": "/health"}}],
        "load_assignment": {"cluster_name": "gateways_http", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(address)}} for address in s.gateways_http]}]},
    })
    if s.tls.enabled:
        cluster["transport_socket"] = _upstream_mtls(s, "gateway", alpn=())
    return cluster


def _upstream_mtls(s: EdgeSettings, peer: str, alpn: tuple[str, ...] = ("h2",)) -> dict[str, Any]:
    """Envoy presents the edge identity and accepts only `peer`'s certificate from the internal CA; through SDS
    (renewals picked up) when tls_sds_dir is set."""
    peer_names = [{"san_type": "DNS", "matcher": {"exact": peer}}]
    common: dict[str, Any] = {"alpn_protocols": list(alpn)}
    if s.tls_sds_dir:
        common["tls_certificate_sds_secret_configs"] = [_sds(s, SDS_INTERNAL_CERTIFICATE)]
        common["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": peer_names},
            "validation_context_sds_secret_config": _sds(s, SDS_INTERNAL_CA)}
    else:
        common["tls_certificates"] = [{"certificate_chain": {"filename": s.tls.cert},
                                       "private_key": {"filename": s.tls.key}}]
        common["validation_context"] = {"trusted_ca": {"filename": s.tls.ca},
                                        "match_typed_subject_alt_names": peer_names}
    return {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", common_tls_context=common)}


def _clusters(s: EdgeSettings) -> list[dict[str, Any]]:
    gateways = _http2_cluster("gateways", s.gateways, 1.0)
    interval = _seconds(s.health_check_interval_s)
    gateways.update({
        "lb_policy": "LEAST_REQUEST",
        "least_request_lb_config": {"choice_count": 2},
        "health_checks": [{"timeout": "2s", "interval": interval, "no_traffic_interval": interval,
                           "unhealthy_threshold": 2, "healthy_threshold": 1, "grpc_health_check": {}}],
        # A gateway that refuses connections is out after 2 local failures; one that answers 5xx after 5.
        "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_failure": 3,
                              "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 2,
                              "interval": "5s", "base_ejection_time": "30s", "max_ejection_percent": 50},
        "circuit_breakers": {"thresholds": [{"max_connections": 4096, "max_pending_requests": 4096,
                                             "max_requests": 4096, "max_retries": 64}]},
    })
    ratelimit = _http2_cluster("ratelimit", [s.ratelimit_address], s.ratelimit_timeout_s)
    if s.tls.enabled:
        gateways["transport_socket"] = _upstream_mtls(s, "gateway")
        ratelimit["transport_socket"] = _upstream_mtls(s, "ratelimit")
    clusters = [gateways, ratelimit]
    if s.gateways_http:
        clusters.append(_openai_cluster(s, gateways))
    if s.otlp_address:
        clusters.append(_http2_cluster("otel_collector", [s.otlp_address], 1.0))
    return clusters


def _tracing(s: EdgeSettings) -> dict[str, Any]:
    return {"random_sampling": {"value": s.trace_sampling_percent},
            "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig", service_name="envoy",
                grpc_service={"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "0.25s"})}}


def _overload_manager(s: EdgeSettings) -> dict[str, Any]:
    """Envoy's edge best practices: shed before the heap or the connection count runs out."""
    heap = "envoy.resource_monitors.fixed_heap"
    connections = "envoy.resource_monitors.global_downstream_max_connections"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {"name": heap, "typed_config": _typed(
                "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                max_heap_size_bytes=s.limits.max_heap_bytes)},
            {"name": connections, "typed_config": _typed(
                "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                max_active_downstream_connections=s.limits.max_connections)},
        ],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap",
             "triggers": [{"name": heap, "threshold": {"value": 0.95}}]},
            {"name": "envoy.overload_actions.disable_http_keepalive",
             "triggers": [{"name": heap, "threshold": {"value": 0.92}}]},
            {"name": "envoy.overload_actions.stop_accepting_requests",
             "triggers": [{"name": heap, "threshold": {"value": 0.98}}]},
        ],
    }


def _metrics_listener(s: EdgeSettings) -> dict[str, Any]:
    """Only GET /stats/prometheus, proxied to the admin interface, which never leaves loopback: Prometheus can
    scrape Envoy without reaching config_dump, drain or quit."""
    manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="edge_metrics", codec_type="AUTO",
        route_config={"name": "metrics", "virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": [
            {"match": {"path": "/stats/prometheus", "headers": [{"name": ":method",
                                                                  "string_match": {"exact": "GET"}}]},
             "route": {"cluster": "envoy_admin"}},
            {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
        ]}]},
        http_filters=[{"name": "envoy.filters.http.router",
                       "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}])
    return {"name": "metrics", "address": _socket(f"{s.metrics_host}:{s.metrics_port}"),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}]}


def _admin_cluster(s: EdgeSettings) -> dict[str, Any]:
    return {"name": "envoy_admin", "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _socket(f"127.0.0.1:{s.admin_port}")}}]}]}}


def render(s: EdgeSettings) -> dict[str, Any]:
    listeners, clusters = [_listener(s)], _clusters(s)
    if s.metrics_port:
        listeners.append(_metrics_listener(s))
        clusters.append(_admin_cluster(s))
    return {
        # Envoy's SDS (the certificates from tls_sds_dir) needs a node identity.
        "node": {"id": "mesh-edge", "cluster": "mesh-edge"},
        # The admin interface can change state (drain, quit, runtime): loopback only, always.
        "admin": {"address": _socket(f"127.0.0.1:{s.admin_port}")},
        "overload_manager": _overload_manager(s),
        # Envoy folds a repeated inline header into one comma-joined value, which the credential routes refuse;
        # a repeated custom header stays separate entries and a route matcher reads only the first. So
        # x-api-key is made inline, like authorization already is.
        "inline_headers": [{"inline_header_name": CREDENTIAL_HEADERS[1], "inline_header_type": "REQUEST_HEADER"}],
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }

"""Writes the Grafana dashboard that compose provisions (compose/grafana/dashboards/inference-mesh.json).

`python -m tools.grafana_dashboard` regenerates it; a test keeps the committed file equal to this output, and
another checks that every metric its queries name exists on a running stack.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "compose" / "grafana" / "dashboards" / "inference-mesh.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
ERROR_CODES = "UNAVAILABLE|INTERNAL|UNKNOWN|DEADLINE_EXCEEDED|DATA_LOSS"

# (title, unit, [(legend, PromQL)]), in rows of two.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests by method and status (gateways)", "reqps", [
        ("{{method}} {{code}}", 'sum by (method, code) (rate(mesh_rpc_requests_total{service="gateway"}[1m]))')]),
    ("Error rate (mesh failures / all requests)", "percentunit", [
        ("{{service}}", f'sum by (service) (rate(mesh_rpc_requests_total{{code=~"{ERROR_CODES}"}}[5m])) '
                        "/ sum by (service) (rate(mesh_rpc_requests_total[5m]))")]),
    ("Latency p50 / p99 by method (gateways)", "s", [
        ("p50 {{method}}", 'histogram_quantile(0.5, sum by (le, method) '
                           '(rate(mesh_rpc_duration_seconds_bucket{service="gateway"}[5m])))'),
        ("p99 {{method}}", 'histogram_quantile(0.99, sum by (le, method) '
                           '(rate(mesh_rpc_duration_seconds_bucket{service="gateway"}[5m])))')]),
    ("Generation duration p95 by model", "s", [
        ("{{model}}", "histogram_quantile(0.95, sum by (le, model) "
                      "(rate(gen_ai_server_request_duration_seconds_bucket[5m])))")]),
    ("Time to first token p50 / p95 by model", "s", [
        ("p50 {{model}}", "histogram_quantile(0.5, sum by (le, model) "
                          "(rate(gen_ai_server_time_to_first_token_seconds_bucket[5m])))"),
        ("p95 {{model}}", "histogram_quantile(0.95, sum by (le, model) "
                          "(rate(gen_ai_server_time_to_first_token_seconds_bucket[5m])))")]),
    ("Time per output token (mean) by model", "s", [
        ("{{model}}", "sum by (model) (rate(gen_ai_server_time_per_output_token_seconds_sum[5m])) "
                      "/ sum by (model) (rate(gen_ai_server_time_per_output_token_seconds_count[5m]))")]),
    ("Output tokens per second by model (throughput)", "short", [
        ("{{model}}", 'sum by (model) (rate(gen_ai_client_token_usage_sum{type="output"}[1m]))')]),
    ("Tokens per minute by tenant", "short", [
        ("{{tenant}} {{type}}", "sum by (tenant, type) (rate(gen_ai_client_token_usage_sum[5m])) * 60")]),
    ("Cache hit rate", "percentunit", [
        ("{{kind}}", 'sum by (kind) (rate(mesh_cache_lookups_total{result=~"exact_hit|semantic_hit|hit"}[5m])) '
                     "/ sum by (kind) (rate(mesh_cache_lookups_total[5m]))")]),
    ("Triton queue depth by replica", "short", [
        ("{{replica}} {{model}}", "sum by (replica, model) (mesh_router_triton_queue_pending)"),
        ("triton {{instance}} {{model}}", "sum by (instance, model) (nv_inference_pending_request_count)")]),
    ("Requests routed per replica", "reqps", [
        ("{{replica}} v{{version}}", "sum by (replica, version) (rate(mesh_router_requests_total[1m]))")]),
    ("Retrieval latency p95 by stage", "s", [
        ("{{stage}}", "histogram_quantile(0.95, sum by (le, stage) "
                      "(rate(mesh_retrieval_stage_duration_seconds_bucket[5m])))")]),
    ("Circuit breakers (0 closed, 1 half-open, 2 open)", "short", [
        ("{{job}} -> {{target}}", "max by (job, target) (mesh_breaker_state)")]),
    ("Shed requests and retries", "reqps", [
        ("shed {{service}} {{reason}}", "sum by (service, reason) (rate(mesh_shed_requests_total[1m]))"),
        ("retries {{target}} {{result}}", "sum by (target, result) (rate(mesh_retries_total[1m]))")]),
    ("CPU utilisation", "percentunit", [
        ("{{job}} {{instance}}", "sum by (job, instance) (rate(process_cpu_seconds_total[1m]))"),
        ("triton {{instance}}", "avg by (instance) (nv_cpu_utilization)")]),
    # Every stream in a process stops while its collector runs (services/common/gc_pauses.py).
    ("Garbage-collector pauses p99 by process", "s", [
        ("{{job}} {{instance}}", "histogram_quantile(0.99, sum by (le, job, instance) "
                                 "(rate(mesh_gc_pause_seconds_bucket[5m])))")]),
    ("GPU utilisation and memory", "percentunit", [
        ("{{instance}} gpu {{gpu_uuid}}", "avg by (instance, gpu_uuid) (nv_gpu_utilization)"),
        ("{{instance}} memory {{gpu_uuid}}", "sum by (instance, gpu_uuid) (nv_gpu_memory_used_bytes) "
                                             "/ sum by (instance, gpu_uuid) (nv_gpu_memory_total_bytes)")]),
    ("Edge: requests to the gateways and rate-limit decisions", "reqps", [
        ("upstream {{envoy_response_code_class}}xx", 'sum by (envoy_response_code_class) '
                                                    '(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="gateways"}[1m]))'),
        ("{{tier}} {{result}}", "sum by (tier, result) (rate(mesh_ratelimit_decisions_total[1m]))")]),
]


def dashboard() -> dict:
    panels = []
    for index, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": index + 1, "type": "timeseries", "title": title, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for i, (legend, expr) in enumerate(targets)],
        })
    return {"uid": "inference-mesh", "title": "Inference mesh", "tags": ["inference-mesh"], "timezone": "utc",
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "panels": panels}


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def queries() -> list[str]:
    return [expr for _, _, targets in PANELS for _, expr in targets]


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")

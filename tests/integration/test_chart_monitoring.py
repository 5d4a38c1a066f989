"""The chart's monitoring on series labelled as the Prometheus Operator labels them. Two real Prometheus servers
scrape the same real stack: one with compose's scrape config (compose/prometheus/prometheus.yml, its targets
pointed at the stack), one with what the operator generates from the chart's ServiceMonitors and Services (job from
jobLabel, the namespace/service/pod/container/endpoint target labels, honorLabels, each endpoint's relabelings).
Every query that reads them (each alert rule, each of its series selectors, each dashboard panel, the KEDA
triggers) must find under the operator's labels the series it finds under compose's: a `service` label the
operator rewrote, or a job named after a Kubernetes Service, would match nothing there."""

from __future__ import annotations

import copy
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.conftest import AUTH, EMBEDDER, chat, debian_tool
from tests.integration.chart import NAMESPACE, render_chart
from tools import grafana_dashboard
from tools.processes import ManagedProcess, free_port, wait_http_ok
from tools.stack import ROOT, LocalStack

# Labels only a Kubernetes target has (its place in the cluster): a query never selects by them.
TARGET_ONLY = {"namespace", "pod", "container", "endpoint"}
SELECTOR = re.compile(r"\b((?:mesh|gen_ai|nv|envoy|process)_\w+|up)\s*(\{[^}]*\})?")


def _sanitized(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def operator_scrape_configs(objects: list[dict], addresses: dict[str, list[str]]) -> list[dict]:
    """The scrape configs the Prometheus Operator makes of the chart's ServiceMonitors, with the pods of each
    component at `addresses` (component label → host:port): the target labels it sets from the endpoints it
    discovers, job from the Service's jobLabel label, honor_labels and relabelings from the endpoint."""
    services = [o for o in objects if o["kind"] == "Service"]
    configs = []
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        for endpoint_index, endpoint in enumerate(monitor["spec"]["endpoints"]):
            for service in services:
                labels = service["metadata"]["labels"]
                ports = [p["name"] for p in service["spec"]["ports"]]
                if any(labels.get(k) != v for k, v in wanted.items()) or endpoint["port"] not in ports:
                    continue
                component = labels["app.kubernetes.io/component"]
                job = labels.get(monitor["spec"].get("jobLabel", ""), service["metadata"]["name"])
                meta = {f"__meta_kubernetes_service_label_{_sanitized(k)}": v for k, v in labels.items()}
                static = []
                for index, address in enumerate(addresses[component]):
                    target = {"namespace": NAMESPACE, "service": service["metadata"]["name"],
                              "pod": f"{service['metadata']['name']}-{index}", "container": component,
                              "endpoint": endpoint["port"], "job": job}
                    for rule in endpoint.get("relabelings", []):
                        assert rule.get("action", "replace") == "replace", rule
                        target[rule["targetLabel"]] = ";".join(meta.get(s, "") for s in rule["sourceLabels"])
                    static.append({"targets": [address], "labels": target})
                configs.append({
                    "job_name": f"serviceMonitor/{NAMESPACE}/{monitor['metadata']['name']}/{endpoint_index}",
                    "honor_labels": bool(endpoint.get("honorLabels", False)),
                    "metrics_path": endpoint.get("path", "/metrics"), "static_configs": static})
    return configs


def compose_scrape_configs(addresses: dict[str, list[str]]) -> list[dict]:
    """compose's scrape config, its targets replaced by the stack's (jobs without a target here dropped)."""
    component = {"gateway": "gateway", "router": "router", "cache": "cache", "retrieval": "retrieval",
                 "ratelimit": "ratelimit", "envoy": "edge"}
    configs = []
    for job in yaml.safe_load((ROOT / "compose" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]:
        if job["job_name"] == "triton":
            static = [{"targets": addresses[f"triton-{group['labels']['pool']}"], "labels": group["labels"]}
                      for group in job["static_configs"] if f"triton-{group['labels']['pool']}" in addresses]
        elif job["job_name"] in component:
            static = [{"targets": addresses[component[job["job_name"]]]}]
        else:
            continue
        configs.append({**job, "static_configs": static})
    return configs


class Prometheus:
    """A real Prometheus (Debian's package, as promtool) scraping every second."""

    def __init__(self, name: str, scrape_configs: list[dict], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                          "scrape_configs": scrape_configs}))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = ManagedProcess(name, [
            debian_tool("prometheus", "prometheus"), f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={self.url.removeprefix('http://')}"],
            workdir / "prometheus.log")
        wait_http_ok(f"{self.url}/-/ready", self.process, 60)

    def query(self, expr: str) -> list[dict[str, str]]:
        """The label sets of an instant query's result (its values differ between two scrapers)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", (expr, body)
        if body["data"]["resultType"] == "scalar":
            return [{}]
        return [series["metric"] for series in body["data"]["result"]]

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="module")
def scrapers(stack: LocalStack, tmp_path_factory) -> Iterator[tuple[Prometheus, Prometheus, list[dict]]]:
    with grpc.insecure_channel(stack.gateway_address) as channel:  # every metric family gets a sample
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        # Three at once on a pool of one slot per replica: two wait in the router's fair queue (its gauge has
        # series only once something queued).
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda n: list(mesh.Generate(chat(f"Name colour {n}.", max_tokens=4), metadata=AUTH,
                                                       timeout=120)), range(3)))
        mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["monitoring"]), metadata=AUTH, timeout=30)
    local = "127.0.0.1:{}".format
    addresses = {
        "gateway": [local(port) for _, port in stack.ports.gateway_ports()],
        "router": [local(stack.ports.router_metrics)], "cache": [local(stack.ports.cache_metrics)],
        "retrieval": [local(stack.ports.retrieval_metrics)], "ratelimit": [local(stack.ports.ratelimit_metrics)],
        "edge": [local(stack.ports.edge_metrics)], "triton-cpu": [local(t.metrics) for t in stack.ports.tritons]}
    objects = render_chart("cpu", "autoscaling.enabled=true")
    workdir = tmp_path_factory.mktemp("prometheus")
    compose = Prometheus("prometheus-compose", compose_scrape_configs(addresses), workdir / "compose")
    operator = Prometheus("prometheus-operator", operator_scrape_configs(objects, addresses), workdir / "operator")
    try:
        # Rates need two samples of every series on both.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(len(p.query("count_over_time(up[1m]) >= 3")) == len(addresses) + len(addresses["gateway"]) - 1
                   for p in (compose, operator)):
                break
            time.sleep(0.5)
        else:
            pytest.fail("both Prometheus servers did not scrape every target three times in 60 s")
        yield compose, operator, objects
    finally:
        compose.stop()
        operator.stop()


def _same_series(compose: list[dict], operator: list[dict]) -> bool:
    """Each series compose's labels give has one under the operator's with the same labels (the operator's
    target-only labels aside, and its `service` target label where the metric has none of its own)."""
    def key(labels: dict, reference: dict | None = None) -> tuple:
        kept = {k: v for k, v in labels.items() if k not in TARGET_ONLY
                and (reference is None or k != "service" or "service" in reference)}
        return tuple(sorted(kept.items()))
    if len(compose) != len(operator):
        return False
    reference = compose[0] if compose else {}
    return sorted(key(c) for c in compose) == sorted(key(o, reference) for o in operator)


def _alert_rules(objects: list[dict]) -> list[dict]:
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_every_alert_and_dashboard_query_finds_the_same_series_under_the_operators_labels(scrapers):
    compose, operator, objects = scrapers
    queries = [r["expr"] for r in _alert_rules(objects)] + grafana_dashboard.queries()
    selectors = sorted({match.group(0) for q in queries for match in SELECTOR.finditer(q)})
    differing, found = [], 0
    for query in [*queries, *selectors]:
        under_compose, under_operator = compose.query(query), operator.query(query)
        found += bool(under_compose)
        if not _same_series(under_compose, under_operator):
            differing.append((query, under_compose[:3], under_operator[:3]))
    assert not differing, json.dumps(differing, indent=1)
    # The comparison means something only where compose finds series; most selectors must.
    assert found >= len(selectors) // 2, (found, len(selectors))


def test_the_autoscalers_queries_find_the_mesh_series_in_the_release_namespace(scrapers):
    _, operator, objects = scrapers
    triggers = {o["metadata"]["name"]: o["spec"]["triggers"][0]["metadata"]["query"]
                for o in objects if o["kind"] == "ScaledObject"}
    assert set(triggers) == {"mesh-gateway", "triton-cpu"}
    assert operator.query(triggers["mesh-gateway"]), triggers["mesh-gateway"]
    # The pool's query falls back to vector(0); its own series must exist for it to mean anything.
    for selector in SELECTOR.finditer(triggers["triton-cpu"]):
        assert operator.query(selector.group(0)), selector.group(0)


def test_a_service_monitor_without_honor_labels_would_lose_the_mesh_service_label(scrapers, stack, tmp_path):
    """The check above can fail: the gateway's ServiceMonitor as it was (no honorLabels, no jobLabel) gives the
    gateway's series service="mesh-gateway" and job="mesh-gateway", and the error-rate alert's selector matches
    nothing."""
    objects = copy.deepcopy(scrapers[2])
    for o in objects:
        if o["kind"] == "ServiceMonitor":
            o["spec"].pop("jobLabel", None)
            for endpoint in o["spec"]["endpoints"]:
                endpoint.pop("honorLabels", None)
    addresses = {"gateway": [f"127.0.0.1:{port}" for _, port in stack.ports.gateway_ports()]}
    configs = operator_scrape_configs(
        [o for o in objects if o["kind"] != "ServiceMonitor" or o["metadata"]["name"] == "mesh-gateway"], addresses)
    old = Prometheus("prometheus-old-monitors", configs, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not old.query('mesh_rpc_requests_total{exported_service="gateway"}') and time.monotonic() < deadline:
            time.sleep(0.5)
        assert old.query('mesh_rpc_requests_total{exported_service="gateway", service="mesh-gateway"}')
        assert not old.query('mesh_rpc_requests_total{service="gateway"}')
        assert old.query('up{job="mesh-gateway"}') and not old.query('up{job="gateway"}')
    finally:
        old.stop()

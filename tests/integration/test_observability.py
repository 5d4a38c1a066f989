"""Observability on the real stack: one Ask through Envoy is one trace across Envoy, the gateway, cache,
retrieval, router and Triton (collected by a real OTLP receiver); alert rules checked and unit-tested with
promtool; every metric the alerts and the dashboard name exists on the running endpoints; JSON logs carry the
trace id, and prompts are logged only redacted; `make top` reads the endpoints."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import yaml

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, retrieval_pb2
from services.gateway.redaction import redact
from tests.conftest import AUTH, KEYS, LLM, chat, debian_tool, service_metric
from tools import grafana_dashboard, top
from tools.otlp_receiver import OtlpReceiver, ReceivedSpan
from tools.stack import ROOT, SERVICE_ENV, LocalStack, StackPorts

PROMETHEUS_DIR = ROOT / "compose" / "prometheus"
EDGE_AUTH = (("x-api-key", KEYS["tenant-a"]),)
SERVICES = {"envoy", "gateway", "cache", "retrieval", "router", "triton-0"}
# Planted in a prompt: none of them may reach a log.
SECRETS = ["jane.doe@example.com", "+1 415 555 0133", "sk-live-4f9a8b7c6d5e4f3a2b1c", "AKIAIOSFODNN7EXAMPLE"]
# Triton exports GPU metrics only where there is a GPU (checked on the GPU machine; BENCHMARKS.md).
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tenants_file):
    receiver = OtlpReceiver().start()
    mesh = LocalStack(tmp_path_factory.mktemp("traced"), StackPorts.free(1, gateways=1), tenants_file=tenants_file,
                      otlp_grpc=receiver.grpc_address, otlp_http=receiver.http_url,
                      service_env={"gateway": {"MESH_GATEWAY_LOG_PROMPTS": "true"}})
    mesh.start()
    yield mesh, receiver
    mesh.stop()
    receiver.stop()


def edge_channel(stack: LocalStack) -> grpc.Channel:
    return grpc.secure_channel(stack.edge_address, grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes()))


def log_lines(stack: LocalStack, process: str) -> list[dict]:
    lines = []
    for line in (stack.run_dir / f"{process}.log").read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_span_id:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain


def _complete(spans: list[ReceivedSpan]) -> bool:
    """Every process has reported, and every span's parent has arrived."""
    ids = {s.span_id for s in spans}
    return {s.service for s in spans} >= SERVICES and all(not s.parent_span_id or s.parent_span_id in ids
                                                          for s in spans)


def test_one_ask_through_envoy_is_one_trace_across_every_process(traced):
    stack, receiver = traced
    with edge_channel(stack) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        mesh.UpsertDocuments(iter([retrieval_pb2.UpsertDocumentsRequest(documents=[retrieval_pb2.Document(
            id="geo/volcano", text="Volcanoes erupt lava where magma reaches the surface.")])]),
            metadata=EDGE_AUTH, timeout=120)
        # Greedy, so the generation goes through the cache too.
        chunks = list(mesh.Ask(mesh_pb2.AskRequest(model=LLM, question="Where does lava come from?", max_tokens=8,
                                                   temperature=0.0),
                               metadata=EDGE_AUTH, timeout=120))
    assert chunks[-1].metadata.citations
    asked = [line for line in log_lines(stack, "gateway") if line["msg"] == "ask"][-1]
    trace_id = asked["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), asked
    deadline = time.monotonic() + 30
    while not _complete(receiver.trace(trace_id)) and time.monotonic() < deadline:
        time.sleep(0.5)  # each process exports in batches (0.5 s here, Triton and Envoy on their own schedules)
    spans = receiver.trace(trace_id)
    services = {s.service for s in spans}
    assert services >= SERVICES, f"missing {SERVICES - services}; got {sorted((s.service, s.name) for s in spans)}"
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert [r.service for r in roots] == ["envoy"], "one root, at the edge"
    broken = [s for s in spans if s.parent_span_id and s.parent_span_id not in by_id]
    assert not broken, f"spans whose parent is not in the trace: {broken}; trace: " + "; ".join(
        f"{s.service} {s.name} {s.span_id[:8]}<-{s.parent_span_id[:8]}" for s in spans)
    for span in spans:
        chain = {a.service for a in ancestors(span, by_id)}
        if span.service == "triton-0":  # the generation streams to the gateway on a lease; embeddings via the router
            assert {"gateway", "envoy"} <= chain, (span, chain)
        if span.service in {"cache", "retrieval", "router"}:
            assert {"gateway", "envoy"} <= chain, (span, chain)
    # The generation's placement lease is the router's part of it.
    assert any(s.service == "router" and "PlacementLeases/Lease" in s.name for s in spans), \
        sorted((s.service, s.name) for s in spans)
    # The query embedding: retrieval -> router -> Triton, inside the same trace.
    assert any(s.service == "router" and "retrieval" in {a.service for a in ancestors(s, by_id)} for s in spans)


def test_an_openai_request_is_one_trace_too(traced):
    """The HTTP API joins Envoy's trace (traceparent) and carries it on to the router and Triton."""
    import httpx

    stack, receiver = traced
    answer = httpx.post(f"https://localhost:{stack.ports.edge}/v1/chat/completions", timeout=60,
                        verify=ssl.create_default_context(cafile=str(stack.pki.ca_cert)),
                        headers={"authorization": f"Bearer {KEYS['tenant-a']}"},
                        json={"model": LLM, "max_tokens": 4, "cache_mode": "bypass",
                              "messages": [{"role": "user", "content": "Name a river."}]})
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while True:  # the line is written by another process: give its stderr a moment to reach the file
        logged = [line for line in log_lines(stack, "gateway")
                  if line["msg"] == "generate" and line.get("request_id") == request_id]
        if logged or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert logged, f"no request log line for {request_id}"
    trace_id = logged[-1]["trace_id"]
    def arrived(spans: list[ReceivedSpan]) -> bool:
        # The HTTP server span ends last (after the response): wait for it, and for every span's parent.
        ids = {s.span_id for s in spans}
        return any(s.service == "gateway" and s.name == "POST /v1/chat/completions" for s in spans) and \
            {"envoy", "router", "triton-0"} <= {s.service for s in spans} and \
            all(not s.parent_span_id or s.parent_span_id in ids for s in spans)

    deadline = time.monotonic() + 30
    while not arrived(receiver.trace(trace_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    spans = receiver.trace(trace_id)
    assert arrived(spans), sorted((s.service, s.name) for s in spans)
    by_id = {s.span_id: s for s in spans}
    http_span = next(s for s in spans if s.service == "gateway" and s.name == "POST /v1/chat/completions")
    assert {a.service for a in ancestors(http_span, by_id)} == {"envoy"}
    triton = [s for s in spans if s.service == "triton-0"]
    assert triton and all(http_span in ancestors(s, by_id) for s in triton)


def test_logs_are_json_with_trace_ids_and_prompts_only_redacted(traced):
    stack, _ = traced
    prompt = ("Reply with OK. My email is jane.doe@example.com, my phone +1 415 555 0133, "
              "key sk-live-4f9a8b7c6d5e4f3a2b1c and AKIAIOSFODNN7EXAMPLE.")
    with grpc.insecure_channel(stack.gateway_address) as channel:
        list(mesh_pb2_grpc.InferenceMeshStub(channel).Generate(chat(prompt, max_tokens=4), metadata=AUTH,
                                                              timeout=60))
    line = [entry for entry in log_lines(stack, "gateway") if entry["msg"] == "generate"][-1]
    for field in ("tenant", "model", "status", "duration_ms", "ttft_ms", "trace_id", "cache", "completion_tokens"):
        assert field in line, (field, line)
    assert "[EMAIL]" in line["prompt"] and "[PHONE]" in line["prompt"] and "[API KEY]" in line["prompt"]
    for log_file in stack.run_dir.glob("*.log"):
        text = log_file.read_text(errors="replace")
        leaked = [secret for secret in SECRETS if secret in text]
        assert not leaked, f"{log_file.name} logged {leaked}"


@pytest.mark.parametrize(("text", "expected"), [
    ("write to jane.doe+x@mail.example.org today", "write to [EMAIL] today"),
    ("call (415) 555-0133 or +44 20 7946 0958", "call [PHONE] or [PHONE]"),
    ("Authorization: Bearer abcdefghijklmnop123", "Authorization: Bearer [TOKEN]"),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXh5eg", "token [JWT]"),
    ("use sk-proj-AbCdEf1234567890XYZ please", "use [API KEY] please"),
    ("password: hunter2!", "password: [SECRET]"),
    ("release 1.2.3 of 2024 has 12 fixes", "release 1.2.3 of 2024 has 12 fixes"),
])
def test_redaction(text, expected):
    assert redact(text) == expected


def promtool() -> str:
    return debian_tool("promtool", "prometheus")


def test_alert_rules_pass_promtool_check_and_unit_tests():
    checked = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    config = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR,
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    tested = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR,
                            capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def _exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _used_names() -> set[str]:
    expressions = grafana_dashboard.queries()
    for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]:
        expressions += [rule["expr"] for rule in group["rules"]]
    names = set()
    for expr in expressions:
        # Label matchers and grouping clauses hold label names, not metric names.
        expr = re.sub(r"\{[^}]*\}|\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
        names |= set(re.findall(r"\b((?:mesh|gen_ai|nv|envoy|process)_\w+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def test_every_metric_in_the_alerts_and_dashboard_exists_on_the_running_stack(traced):
    stack, _ = traced
    with edge_channel(stack) as channel:  # every family gets traffic first, the edge's too
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        list(mesh.Generate(chat("Say one word.", max_tokens=2), metadata=EDGE_AUTH, timeout=60))
        mesh.Embed(mesh_pb2.EmbedRequest(model="all-minilm-l6-v2", texts=["metrics"]), metadata=EDGE_AUTH,
                   timeout=30)
    ports = [stack.ports.gateway_metrics, stack.ports.router_metrics, stack.ports.cache_metrics,
             stack.ports.retrieval_metrics, stack.ports.ratelimit_metrics, stack.ports.tritons[0].metrics]
    exposed = set()
    for url in [f"http://127.0.0.1:{p}/metrics" for p in ports] + \
               [f"http://127.0.0.1:{stack.ports.edge_admin}/stats/prometheus"]:
        exposed |= _exposed_names(urllib.request.urlopen(url, timeout=5).read().decode())
    # The GenAI metrics carry the generation's numbers (a cache miss; hits are left out).
    gateway = stack.ports.gateway_metrics
    assert service_metric(gateway, "gen_ai_server_time_to_first_token_seconds_count", model=LLM) >= 1
    assert service_metric(gateway, "gen_ai_client_token_usage_sum", tenant="tenant-a", model=LLM, type="output") >= 1
    assert service_metric(gateway, "mesh_rpc_requests_total", service="gateway", method="Generate", code="OK") >= 1
    used = _used_names()
    assert len(used) > 20, used
    missing = sorted(name for name in used - GPU_ONLY
                     if name not in exposed and f"{name}_total" not in exposed and
                     not any(n.startswith(name + "_") for n in exposed))
    assert not missing, f"named by alerts or dashboard but not exposed: {missing}"


def test_committed_dashboard_is_the_generated_one():
    assert grafana_dashboard.OUT.read_text() == grafana_dashboard.render(), \
        "run `python -m tools.grafana_dashboard` and commit the result"


def test_make_top_shows_each_service(traced):
    stack, _ = traced
    endpoints = {"gateway": stack.ports.gateway_metrics, "router": stack.ports.router_metrics,
                 "cache": stack.ports.cache_metrics, "retrieval": stack.ports.retrieval_metrics}
    command = [sys.executable, "-m", "tools.top", "--once", "--interval", "2"]
    for name, port in endpoints.items():
        command += ["--endpoint", f"{name}=127.0.0.1:{port}"]
    top = subprocess.Popen(command, cwd=ROOT, env={**SERVICE_ENV, "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE,
                           text=True)
    with grpc.insecure_channel(stack.gateway_address) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
        i = 0
        while top.poll() is None:  # traffic for as long as top watches, whenever it starts scraping
            mesh.Embed(mesh_pb2.EmbedRequest(model="all-minilm-l6-v2", texts=[f"top {i % 3}"]), metadata=AUTH,
                       timeout=30)
            i += 1
    output, _ = top.communicate(timeout=30)
    rows = {line.split()[0]: line.split()[1:] for line in output.splitlines()[2:]}
    assert set(rows) == set(endpoints), output
    assert float(rows["gateway"][0]) > 0 and rows["gateway"][1] != "-", output
    # Embedding lookups are decided in the gateway (it reads Redis itself): the hit rate is on its row.
    assert rows["gateway"][3].endswith("%"), output


def test_top_p99_from_bucket_deltas():
    before = top.Scrape(0.0, buckets={0.01: 0, 0.1: 0, 1.0: 0, float("inf"): 0})
    after = top.Scrape(1.0, buckets={0.01: 50, 0.1: 99, 1.0: 100, float("inf"): 100})
    assert 0.01 * 1000 < top.p99_ms(before, after) <= 0.1 * 1000
    after = top.Scrape(1.0, buckets={0.01: 0, 0.1: 0, 1.0: 100, float("inf"): 100})
    assert abs(top.p99_ms(before, after) - (0.1 + 0.9 * 0.99) * 1000) < 1e-6
    assert top.p99_ms(before, before) != top.p99_ms(before, before), "no requests: no p99 (NaN)"

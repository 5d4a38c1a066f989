"""The edge: the real Envoy (TLS, jwt_authn, local shield, global rate limits) in front of two gateways."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.duration_pb2 import Duration

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, quota_pb2
from services.common.deadlines import GENERATION_BUDGET_S, INGEST_BUDGET_S
from services.common.tenants import Tenant, TenantConfig, Tier
from services.edge.render import render
from services.edge.settings import EdgeSettings
from services.gateway.plan import estimated_cost
from services.ratelimit.buckets import LimitStore
from services.ratelimit.token_budget import TokenBudgetService
from tests.conftest import EMBEDDER, KEYS, TIERS, chat
from tests.integration.test_grpcurl import grpcurl
from tools.edge import gateway_stat, start_envoy, validate, wait_edge_ready, write_config
from tools.pki import make_ca, mint_jwt
from tools.processes import free_port
from tools.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]


def key(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", KEYS[tenant]),)


def tls_channel(stack: LocalStack, address: str | None = None, ca: Path | None = None,
                client_cert: bool = False) -> grpc.Channel:
    pki = stack.pki
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca_cert).read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None)
    return grpc.secure_channel(address or stack.edge_address, credentials)


@pytest.fixture(scope="module")
def edge(stack: LocalStack) -> Iterator[mesh_pb2_grpc.InferenceMeshStub]:
    with tls_channel(stack) as channel:
        yield mesh_pb2_grpc.InferenceMeshStub(channel)


def embed(mesh: mesh_pb2_grpc.InferenceMeshStub, metadata, text: str = "edge") -> mesh_pb2.EmbedResponse:
    return mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=[text]), metadata=metadata, timeout=10)


@contextmanager
def variant_edge(stack: LocalStack, run_dir: Path, **overrides) -> Iterator[EdgeSettings]:
    """A second Envoy over the same gateways, with some settings changed."""
    settings = stack.edge_settings().model_copy(update={
        "port": free_port(), "admin_port": free_port(), "metrics_port": 0, **overrides})
    process = start_envoy(settings, run_dir, name="envoy-variant")
    try:
        wait_edge_ready(process, settings)
        yield settings
    finally:
        process.stop()


# --- the config ----------------------------------------------------------------------------------------------


def test_rendered_configs_pass_envoy_validate(stack, tmp_path):
    base = stack.edge_settings()
    for name, settings in {"stack": base,
                           "mtls": base.model_copy(update={"require_client_cert": True}),
                           "fail-open": base.model_copy(update={"ratelimit_fail_open": True})}.items():
        checked = validate(write_config(settings, tmp_path / f"{name}.yaml"))
        assert checked.returncode == 0 and "OK" in checked.stdout, f"{name}: {checked.stdout}{checked.stderr}"
    broken = render(base)
    broken["static_resources"]["clusters"][0]["lb_policy"] = "LEAST_REQUESTS"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert validate(tmp_path / "broken.yaml").returncode != 0, "validate must refuse a wrong config"


def test_committed_envoy_config_is_the_rendered_defaults():
    committed = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    assert committed == render(EdgeSettings()), "re-render it: python -m services.edge --out envoy/envoy.yaml"


def test_rendered_config_follows_the_settings(stack):
    config = render(stack.edge_settings())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    gateways = config["static_resources"]["clusters"][0]
    assert gateways["lb_policy"] == "LEAST_REQUEST"
    assert gateways["health_checks"][0]["interval"] == "10s" and "grpc_health_check" in gateways["health_checks"][0]
    endpoints = [e["endpoint"]["address"]["socket_address"]["port_value"]
                 for e in gateways["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert endpoints == [port for port, _ in stack.ports.gateway_ports()]
    routes = {r["match"].get("path") or r["match"]["prefix"]: r["route"]
              for r in config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
              ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] if "route" in r}
    # A second longer than the gateway's own deadline: the caller gets its precise DEADLINE_EXCEEDED, not a 504.
    assert routes["/inference_mesh.v1.InferenceMesh/Generate"]["timeout"] == f"{GENERATION_BUDGET_S + 1:.0f}s"
    assert "unavailable" not in routes["/inference_mesh.v1.InferenceMesh/Generate"]["retry_policy"]["retry_on"]
    assert "unavailable" in routes["/inference_mesh.v1.InferenceMesh/Embed"]["retry_policy"]["retry_on"]
    assert routes["/inference_mesh.v1.InferenceMesh/"]["timeout"] == "5s"
    # Batches: a file streams for an ingest's time; nothing a gateway saw is retried (an upload or a create writes).
    assert routes["/inference_mesh.v1.Batches/UploadFile"]["timeout"] == f"{INGEST_BUDGET_S:.0f}s"
    assert all("unavailable" not in route["retry_policy"]["retry_on"] for match, route in routes.items()
               if match.startswith("/inference_mesh.v1.Batches/"))


# --- TLS -----------------------------------------------------------------------------------------------------


def test_plaintext_is_refused(stack):
    with grpc.insecure_channel(stack.edge_address) as channel, pytest.raises(grpc.RpcError) as refused:
        mesh_pb2_grpc.InferenceMeshStub(channel).ListModels(mesh_pb2.ListModelsRequest(), metadata=key("tenant-b"),
                                                            timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_server_certificate_from_another_ca_is_refused(stack, tmp_path):
    make_ca(tmp_path, "some other CA")
    with tls_channel(stack, ca=tmp_path / "ca.pem") as channel, pytest.raises(grpc.RpcError) as refused:
        mesh_pb2_grpc.InferenceMeshStub(channel).ListModels(mesh_pb2.ListModelsRequest(), metadata=key("tenant-b"),
                                                            timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_switch_requires_a_client_certificate(stack, tmp_path):
    with variant_edge(stack, tmp_path, require_client_cert=True) as settings:
        address = f"127.0.0.1:{settings.port}"
        with tls_channel(stack, address) as channel, pytest.raises(grpc.RpcError) as refused:
            embed(mesh_pb2_grpc.InferenceMeshStub(channel), key("tenant-b"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls_channel(stack, address, client_cert=True) as channel:
            assert embed(mesh_pb2_grpc.InferenceMeshStub(channel), key("tenant-b")).metadata.tenant == "tenant-b"


def test_admin_interface_listens_on_loopback_only(stack):
    listeners = urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.edge_admin}/listeners", timeout=5).read()
    assert f"127.0.0.1:{stack.ports.edge}".encode() in listeners
    assert render(stack.edge_settings().model_copy(update={"host": "0.0.0.0"}))["admin"]["address"][
        "socket_address"]["address"] == "127.0.0.1"


# --- authentication ------------------------------------------------------------------------------------------


def _foreign_key(tmp_path: Path) -> Path:
    path = tmp_path / "foreign.pem"
    path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


@pytest.mark.parametrize("case", ["missing", "wrong key", "expired jwt", "wrongly signed jwt", "forged tenant header",
                                  "wrong audience"])
def test_bad_credentials_are_refused(stack, edge, tmp_path, case):
    pki = stack.pki
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    metadata, code, expected = {
        "missing": ((), unauthenticated, "missing credentials"),
        "wrong key": ((("x-api-key", "not-a-key"),), unauthenticated, "invalid API key"),
        "expired jwt": ((("authorization", f"Bearer {mint_jwt(pki, 'tenant-b', ttl_s=-600)}"),), unauthenticated,
                        "Jwt is expired"),
        "wrongly signed jwt": ((("authorization",
                                 f"Bearer {mint_jwt(pki, 'tenant-b', key_path=_foreign_key(tmp_path))}"),),
                               unauthenticated, "Jwt verification fails"),
        "forged tenant header": ((("x-mesh-jwt-tenant", "tenant-b"),), unauthenticated, "missing credentials"),
        # A genuine token issued for another service: authenticated, but not allowed here (Envoy answers 403).
        "wrong audience": ((("authorization", f"Bearer {mint_jwt(pki, 'tenant-b', audience='elsewhere')}"),),
                           grpc.StatusCode.PERMISSION_DENIED, "Audiences in Jwt are not allowed"),
    }[case]
    with pytest.raises(grpc.RpcError) as refused:
        embed(edge, metadata)
    assert refused.value.code() == code, refused.value.details()
    assert expected in refused.value.details()


def test_a_valid_jwt_names_the_tenant(stack, edge):
    token = mint_jwt(stack.pki, "tenant-b")
    assert embed(edge, (("authorization", f"Bearer {token}"),)).metadata.tenant == "tenant-b"


def test_a_client_cannot_claim_another_tenant(edge):
    answer = embed(edge, (*key("tenant-a"), ("x-mesh-jwt-tenant", "tenant-b"), ("x-mesh-edge-secret", "guess")))
    assert answer.metadata.tenant == "tenant-a"


# --- clients over TLS ----------------------------------------------------------------------------------------


def test_grpcurl_through_envoy_with_tls_and_reflection(stack):
    ca = str(stack.pki.ca_cert)
    listed = subprocess.run([grpcurl(), "-cacert", ca, stack.edge_address, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {"inference_mesh.v1.InferenceMesh", "inference.GRPCInferenceService"} <= set(listed.stdout.split())
    called = subprocess.run([grpcurl(), "-cacert", ca, "-H", f"x-api-key: {KEYS['tenant-b']}", "-d", "{}",
                             stack.edge_address, "inference_mesh.v1.InferenceMesh/ListModels"],
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0 and EMBEDDER in called.stdout, called.stderr
    plaintext = subprocess.run([grpcurl(), "-plaintext", stack.edge_address, "list"],
                               capture_output=True, text=True, timeout=60)
    assert plaintext.returncode != 0


def test_tritonclient_with_ssl_through_envoy(stack):
    client = triton_grpc.InferenceServerClient(stack.edge_address, ssl=True,
                                               root_certificates=str(stack.pki.ca_cert))
    headers = {"x-api-key": KEYS["tenant-b"]}
    try:
        assert client.is_server_ready(headers=headers)
        text = triton_grpc.InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"through the edge"]], dtype=object))
        vectors = client.infer(EMBEDDER, [text], headers=headers).as_numpy("EMBEDDING")
        assert vectors.shape == (1, 384)
    finally:
        client.close()


# --- rate limits and budgets ---------------------------------------------------------------------------------


def _requests_per_gateway(stack: LocalStack) -> Counter[str]:
    return Counter({address: gateway_stat(stack.ports.edge_admin, address, "rq_total")
                    for address in stack.gateway_addresses})


def test_a_burst_gets_resource_exhausted_for_the_excess_only(stack):
    tier = TIERS["standard"]
    rate, burst = tier["requests_per_minute"] / 60.0, tier["burst"]
    outcomes: list[tuple[grpc.StatusCode, str, dict[str, str]]] = []
    lock = threading.Lock()
    before = _requests_per_gateway(stack)

    def fire(count: int) -> None:
        with tls_channel(stack) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            for _ in range(count):
                try:
                    mesh.ListModels(mesh_pb2.ListModelsRequest(), metadata=key("tenant-std"), timeout=10)
                    outcome = (grpc.StatusCode.OK, "", {})
                except grpc.RpcError as exc:
                    outcome = (exc.code(), exc.details(), dict(exc.trailing_metadata() or ()))
                with lock:
                    outcomes.append(outcome)

    workers = [threading.Thread(target=fire, args=(15,)) for _ in range(8)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    codes = Counter(code for code, _, _ in outcomes)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
    expected = burst + rate * elapsed
    assert abs(codes[grpc.StatusCode.OK] - expected) <= 0.05 * expected, (codes, elapsed, expected)
    for code, details, trailing in outcomes:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "tenant-std" in details and "300 requests/min" in details, details
            assert int(trailing["retry-after"]) >= 1
    served = _requests_per_gateway(stack) - before
    assert len(served) == 2 and all(count > 0 for count in served.values()), f"both gateways serve: {served}"


def test_token_budget_exhaustion_and_reset(edge):
    budget = TIERS["small-budget"]["tokens_per_minute"]
    refill_per_s = budget / 60.0
    used, retry_after = 0, 0
    started = time.monotonic()
    for _ in range(40):
        try:
            chunks = list(edge.Generate(chat("Count from one to twenty.", max_tokens=16, temperature=0.8),
                                        metadata=key("tenant-budget"), timeout=60))
            used += chunks[-1].usage.total_tokens
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "token budget" in exc.details() and "300 tokens per minute" in exc.details(), exc.details()
            retry_after = int(dict(exc.trailing_metadata())["retry-after"])
            break
    else:
        pytest.fail(f"40 generations ({used} tokens) never exhausted a {budget}-token budget")
    refilled = refill_per_s * (time.monotonic() - started)
    # Each generation reserves its worst case before it starts (services/gateway/plan.py: the prompt at a token per
    # 3 characters, the template, max_tokens) and settles its real use: the last one is refused once less than a
    # worst case is left, and nothing is ever spent past the budget and its refill.
    worst = estimated_cost(chat("Count from one to twenty.", max_tokens=16))
    assert budget - worst <= used <= budget + refilled, (used, refilled, worst)
    assert 1 <= retry_after <= 20
    time.sleep(retry_after)
    chunks = list(edge.Generate(chat("Say hi.", max_tokens=4, temperature=0.8), metadata=key("tenant-budget"),
                                timeout=60))
    assert chunks[-1].usage.completion_tokens > 0, "the budget refills after the retry-after hint"


def test_a_cancelled_stream_is_charged_its_prompt_and_the_tokens_produced(stack, edge):
    """Found in the field: a stream cancelled after 3 events of a 1,841-token reservation settled at 3 tokens:
    the prompt the model had read was never charged."""
    from inference_mesh.v1 import quota_pb2_grpc

    def month_remaining() -> int:
        with grpc.insecure_channel(stack.ratelimit_address) as channel:
            return quota_pb2_grpc.TokenBudgetStub(channel).Check(
                quota_pb2.BudgetCheckRequest(tenant="tenant-metered"), timeout=5).month_remaining

    story = "Tell a long story about a lighthouse keeper and the sea. " * 12
    first = list(edge.Generate(chat(story, max_tokens=1, temperature=0.0, cache_mode=mesh_pb2.CACHE_MODE_BYPASS),
                               metadata=key("tenant-metered"), timeout=60))
    prompt = first[-1].usage.prompt_tokens
    assert prompt > 100
    time.sleep(0.5)  # its settlement is written in the background
    before = month_remaining()
    call = edge.Generate(chat(story, max_tokens=200, temperature=0.0, cache_mode=mesh_pb2.CACHE_MODE_BYPASS),
                         metadata=key("tenant-metered"), timeout=60)
    read = [chunk for _, chunk in zip(range(3), call, strict=False)]
    call.cancel()
    assert len(read) == 3 and not read[-1].finish_reason
    # The worst case is held while the stream runs; the settlement (in the background) gives back the rest.
    worst = estimated_cost(chat(story, max_tokens=200))
    charged, deadline = 0, time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        charged = before - month_remaining()
        if 0 < charged < worst:
            break
    assert prompt + 3 <= charged < worst, (prompt, charged, worst)


async def test_month_budget_resets_with_the_calendar_month(stack):
    config = TenantConfig(tiers={"t": Tier(requests_per_minute=60, burst=5, tokens_per_month=1000)},
                          tenants=[Tenant(id="acme", tier="t")])
    now = [dt.datetime(2026, 1, 31, 23, 59, tzinfo=dt.UTC)]
    store = LimitStore(stack.state_redis_url, "test-month", 1.0)
    service = TokenBudgetService(config, store, clock=lambda: now[0])
    try:
        await store.reset("acme")
        assert (await service.Check(quota_pb2.BudgetCheckRequest(tenant="acme"), None)).month_remaining == 1000
        await service.Charge(quota_pb2.BudgetChargeRequest(tenant="acme", tokens=1000), None)
        spent = await service.Check(quota_pb2.BudgetCheckRequest(tenant="acme"), None)
        assert not spent.allowed and spent.exhausted == quota_pb2.BUDGET_WINDOW_MONTH and spent.limit == 1000
        assert spent.retry_after.ToTimedelta() == dt.timedelta(minutes=1)
        now[0] = dt.datetime(2026, 2, 1, 0, 0, 1, tzinfo=dt.UTC)
        fresh = await service.Check(quota_pb2.BudgetCheckRequest(tenant="acme"), None)
        assert fresh.allowed and fresh.month_remaining == 1000
    finally:
        await store.reset("acme")
        await store.close()


def _edge_stat(stack: LocalStack, name: str) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.edge_admin}/stats?filter={name}",
                                  timeout=5).read().decode()
    return sum(int(line.rsplit(": ", 1)[1]) for line in text.splitlines() if line.split(": ")[0].endswith(name))


def test_rate_limit_service_down_is_a_refusal_with_a_retry_hint_and_counted(stack, edge):
    """Fail closed: a rate-limit error is a deny, never an unlimited pass (a credential byte that made the
    rate-limit service fail once let 45 of 45 requests through an empty bucket). gRPC callers get UNAVAILABLE,
    their cue to retry with backoff; HTTP callers 503 in OpenAI's shape with retry-after."""
    errors_before = _edge_stat(stack, "ratelimit.error")
    stack.processes["ratelimit"].stop()
    try:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                embed(edge, key("tenant-a"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        answer = httpx.get(f"https://localhost:{stack.ports.edge}/v1/models", timeout=10,
                           headers={"authorization": f"Bearer {KEYS['tenant-a']}"},
                           verify=ssl.create_default_context(cafile=str(stack.pki.ca_cert)))
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
        assert answer.json()["error"]["type"] == "server_error"
    finally:
        stack.start_ratelimit()
    assert _edge_stat(stack, "ratelimit.error") >= errors_before + 4
    assert embed(edge, key("tenant-a")).metadata.tenant == "tenant-a", "served again once it is back"


def test_the_fail_open_switch_lets_requests_through_when_the_rate_limit_service_is_down(stack, tmp_path):
    with variant_edge(stack, tmp_path, ratelimit_fail_open=True, ratelimit_address=f"127.0.0.1:{free_port()}") \
            as settings, tls_channel(stack, f"127.0.0.1:{settings.port}") as channel:
        assert embed(mesh_pb2_grpc.InferenceMeshStub(channel), key("tenant-a")).metadata.tenant == "tenant-a"


# --- balancing and failover (last: it stops a gateway) -------------------------------------------------------


def test_load_spreads_over_both_gateways_and_survives_one_killed_under_load(stack):
    failures: list[str] = []
    done = Counter()
    lock = threading.Lock()

    def load(count: int) -> None:
        with tls_channel(stack) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            for i in range(count):
                try:
                    embed(mesh, key("tenant-bulk"), f"spread {i}")
                    with lock:
                        done["ok"] += 1
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{exc.code().name}: {exc.details()}")

    def run_load(kill_midway: bool = False) -> Counter[str]:
        before = _requests_per_gateway(stack)
        workers = [threading.Thread(target=load, args=(40,)) for _ in range(6)]
        for worker in workers:
            worker.start()
        if kill_midway:
            while done["ok"] < 120 and any(w.is_alive() for w in workers):
                time.sleep(0.01)
            stack.processes["gateway-1"].kill()  # SIGKILL while calls are in flight on it
        for worker in workers:
            worker.join()
        return _requests_per_gateway(stack) - before

    served = run_load()
    assert not failures and all(served[a] > 20 for a in stack.gateway_addresses), (served, failures)
    done.clear()
    try:
        run_load(kill_midway=True)
        assert not failures, failures[:5]
        assert done["ok"] == 240, "every unary call succeeds: Envoy retries the ones the killed gateway had"
    finally:
        stack.start_gateway(1)


async def test_reservations_hold_the_worst_case_settle_the_rest_and_expire_when_never_settled(stack):
    config = TenantConfig(tiers={"t": Tier(requests_per_minute=60, burst=5, tokens_per_minute=600,
                                           tokens_per_month=10_000)},
                          tenants=[Tenant(id="acme", tier="t")])
    store = LimitStore(stack.state_redis_url, "test-reserve", 1.0)
    service = TokenBudgetService(config, store)

    def reserve(tokens: int, ttl_s: int = 60) -> quota_pb2.BudgetReserveRequest:
        return quota_pb2.BudgetReserveRequest(tenant="acme", tokens=tokens, ttl=Duration(seconds=ttl_s))

    try:
        await store.reset("acme")
        first = await service.Reserve(reserve(400), None)
        assert first.check.allowed and first.reservation and first.check.minute_remaining <= 200
        refused = await service.Reserve(reserve(400), None)
        assert not refused.check.allowed and refused.check.exhausted == quota_pb2.BUDGET_WINDOW_MINUTE
        assert refused.check.limit == 600 and refused.check.retry_after.ToTimedelta().total_seconds() > 0
        # 100 used of 400 held: 300 go back, so another 400 fit now.
        settled = await service.Settle(quota_pb2.BudgetSettleRequest(tenant="acme", reservation=first.reservation,
                                                                    used_tokens=100), None)
        assert settled.settled
        second = await service.Reserve(reserve(400, ttl_s=1), None)
        assert second.check.allowed and second.check.month_remaining == 10_000 - 100 - 400
        # Its gateway never settles it: after its ttl the sweep gives everything back.
        await asyncio.sleep(1.2)
        assert await service.expire_reservations() >= 1
        after = await service.Check(quota_pb2.BudgetCheckRequest(tenant="acme"), None)
        assert after.month_remaining == 10_000 - 100 and after.minute_remaining >= 490
        late = await service.Settle(quota_pb2.BudgetSettleRequest(tenant="acme", reservation=second.reservation,
                                                                 used_tokens=50), None)
        assert not late.settled, "an expired reservation cannot be settled twice; its use is charged instead"
        assert (await service.Check(quota_pb2.BudgetCheckRequest(tenant="acme"), None)).month_remaining == 9_850
    finally:
        await store.reset("acme")
        await store.close()

"""The admin plane through the real Envoy (TLS, JWT) and gateways, on SQLite (the shared stack) and on a real
PostgreSQL server (a second, small stack): a tenant and a key made with an admin JWT work at the edge within the
poll bound, a rotated key overlaps, a revoked key is cut off mid-flood within the bound; tenant credentials are
refused on the admin API; bad input is refused with nothing written."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from bench.token_relay import MODEL as RELAY_MODEL
from bench.token_relay import relay_stack
from inference_mesh.v1 import admin_pb2, admin_pb2_grpc, mesh_pb2_grpc, router_pb2
from tests.conftest import KEYS, chat
from tests.integration.admin_helpers import (
    BOUND_S,
    FLUSH_S,
    admin_client,
    edge_client,
    in_force,
    models_status,
    new_key,
    report,
    usable,
    wait_for,
)
from tools.pki import mint_admin_jwt, mint_jwt
from tools.postgres import PostgresServer, start_postgres
from tools.stack import LocalStack


@dataclass
class Flood:
    """Threads calling /v1/models with one key as fast as they can: (sent, answered, status) per request."""
    stack: LocalStack
    key: str
    threads: int = 4
    calls: list[tuple[float, float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        with edge_client(self.stack) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                status = models_status(client, self.stack, self.key)
                self.calls.append((sent, time.monotonic(), status))

    def __enter__(self) -> Flood:
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(15)


def key_lifecycle(stack: LocalStack) -> dict[str, float]:
    """Create, use, rotate, revoke under load; what was measured."""
    admin = admin_client(stack)
    tenant = f"admin-test-{uuid.uuid4().hex[:8]}"
    admin.ok("PUT", "/tiers/admin-bulk", {"requests_per_minute": 100000, "burst": 10000})
    created = admin.call("POST", "/tenants", {"id": tenant, "tier": "admin-bulk"})
    assert created.status_code == 201 and created.json()["tier"] == "admin-bulk", created.text
    issued = admin.call("POST", f"/tenants/{tenant}/keys", {"labels": {"team": "search"}})
    assert issued.status_code == 201, issued.text
    secret, key = issued.json()["secret"], issued.json()["key"]
    assert secret.startswith("mk_") and key["prefix"] == secret[:10] and key["labels"] == {"team": "search"}
    listed = admin.ok("GET", f"/keys?prefix={secret[:12]}")["keys"]
    assert [k["id"] for k in listed] == [key["id"]] and "secret" not in listed[0], "the secret is shown once"

    with edge_client(stack) as client:
        propagation = usable(client, stack, secret)
        assert propagation <= BOUND_S + 1.0, f"a new key took {propagation:.2f} s to reach the edge"

        rotated = admin.call("POST", f"/keys/{key['id']}/rotate", {"overlap_s": 2.5})
        assert rotated.status_code == 201, rotated.text
        rotated_at = time.monotonic()
        successor = rotated.json()["secret"]
        usable(client, stack, successor)
        assert models_status(client, stack, secret) == 200, "the old key works during the overlap"
        wait_for(client, stack, secret, 401, timeout_s=10)
        old_refused = time.monotonic() - rotated_at
        assert 2.5 - 0.2 <= old_refused <= 2.5 + BOUND_S + 1.0, old_refused

        with Flood(stack, successor) as flood:
            time.sleep(1.0)
            revoke_sent = time.monotonic()
            revoked = admin.call("POST", f"/keys/{rotated.json()['key']['id']}/revoke")
            revoked_at = time.monotonic()
            assert revoked.status_code == 200 and revoked.json()["revoked_at"] > 0, revoked.text
            time.sleep(BOUND_S + 1.5)
    statuses = {status for _, _, status in flood.calls}
    assert statuses <= {200, 401}, f"only served or refused, never an error: {statuses}"
    before = [s for sent, done, s in flood.calls if done < revoke_sent]
    assert before and set(before) == {200}, "the key worked until the revocation"
    last_served = max(sent for sent, _, s in flood.calls if s == 200)
    cut_off_s = last_served - revoked_at
    assert cut_off_s <= BOUND_S, f"a revoked key was still served {cut_off_s:.2f} s after its revocation"
    after = [s for sent, _, s in flood.calls if sent > revoked_at + BOUND_S]
    assert after and set(after) == {401}, "refused for good after the bound"
    return {"new key usable after (s)": propagation, "revoked key last served after (s)": max(cut_off_s, 0.0),
            "requests in the flood": len(flood.calls)}


def test_key_lifecycle_on_sqlite(stack):
    measured = key_lifecycle(stack)
    print("admin plane on SQLite:", measured)


@pytest.fixture(scope="module")
def postgres_stack(tmp_path_factory) -> Iterator[tuple[LocalStack, PostgresServer]]:
    root = tmp_path_factory.mktemp("admin-postgres")
    server = start_postgres(root / "postgres.log")
    stack = relay_stack(root / "stack")
    stack.admin_db_url = server.url
    try:
        stack.start()
        yield stack, server
    finally:
        stack.stop()
        server.stop()


def test_key_lifecycle_on_postgresql(postgres_stack):
    stack, _ = postgres_stack
    measured = key_lifecycle(stack)
    print("admin plane on PostgreSQL:", measured)


def test_a_tier_change_reaches_the_rate_limit_service(postgres_stack):
    """A tier's request limit lowered through the admin API is enforced at the edge without a restart."""
    stack, _ = postgres_stack
    admin = admin_client(stack)
    tenant, (issued,) = admin.tenant_with_keys("admin-tier", "admin-roomy",
                                               {"requests_per_minute": 100000, "burst": 10000}, {})
    secret = issued["secret"]
    with edge_client(stack) as client:
        usable(client, stack, secret)
        admin.ok("PUT", "/tiers/admin-tight", {"requests_per_minute": 60, "burst": 2})
        admin.ok("PATCH", f"/tenants/{tenant}", {"tier": "admin-tight"})
        in_force(stack)
        # The edge's rate-limit replica may still spend a lease it took under the old tier (lease_ttl_s 1 s).
        deadline = time.monotonic() + 3.0
        while True:
            statuses = [models_status(client, stack, secret) for _ in range(8)]
            if (429 in statuses and statuses.count(200) <= 4) or time.monotonic() > deadline:
                break
        assert 429 in statuses and statuses.count(200) <= 4, statuses
        admin.ok("PATCH", f"/tenants/{tenant}", {"suspended": True})
        in_force(stack)
        # The tight tier's bucket (1 a second) may answer 429 first: the gateway's refusal comes once it lets one by.
        deadline = time.monotonic() + 3.0
        while True:
            refused = client.get(f"https://localhost:{stack.ports.edge}/v1/models",
                                 headers={"authorization": f"Bearer {secret}"})
            if refused.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert refused.status_code == 401 and "suspended" in refused.json()["error"]["message"], refused.text


def test_a_key_with_its_own_limit_is_held_to_it_and_its_tenant_is_not(postgres_stack):
    stack, _ = postgres_stack
    admin = admin_client(stack)
    tenant, (narrow, wide) = admin.tenant_with_keys("admin-keylimit", "admin-roomy",
                                                    {"requests_per_minute": 100000, "burst": 10000},
                                                    {"requests_per_minute": 60, "burst": 2}, {})
    assert (narrow["key"]["requests_per_minute"], narrow["key"]["burst"]) == (60, 2)
    over = admin.call("POST", f"/tenants/{tenant}/keys", {"requests_per_minute": 200000, "burst": 2})
    assert over.status_code == 400 and "under its tier's" in over.json()["error"]["message"], over.text
    with edge_client(stack) as client:
        usable(client, stack, narrow["secret"])
        usable(client, stack, wide["secret"])
        time.sleep(2.5)  # the probes' requests spent the narrow key's burst: let it refill (1 a second)
        answers = [client.get(f"https://localhost:{stack.ports.edge}/v1/models",
                              headers={"authorization": f"Bearer {narrow['secret']}"}) for _ in range(6)]
        statuses = [a.status_code for a in answers]
        assert statuses[:2] == [200, 200] and statuses.count(429) >= 3, statuses
        refused = next(a for a in answers if a.status_code == 429)
        assert narrow["key"]["id"] in refused.json()["error"]["message"] and "retry-after" in refused.headers
        assert [models_status(client, stack, wide["secret"]) for _ in range(6)] == [200] * 6, \
            "the tenant's other key is not held to that key's limit"


def test_a_key_with_its_own_token_budget_is_held_to_it(postgres_stack):
    """A key's tokens_per_minute is reserved and settled beside its tenant's: a generation whose worst case the
    key's window cannot hold is refused, the same generation on the tenant's other key runs."""
    stack, _ = postgres_stack
    admin = admin_client(stack)
    tenant, (narrow, wide) = admin.tenant_with_keys("admin-keybudget", "admin-budgeted",
                                                    {"requests_per_minute": 100000, "burst": 10000,
                                                     "tokens_per_minute": 1000000, "tokens_per_month": 0},
                                                    {"tokens_per_minute": 400}, {})
    over = admin.call("POST", f"/tenants/{tenant}/keys", {"tokens_per_minute": 2000000})
    assert over.status_code == 400 and "tokens_per_minute must be under" in over.text, over.text
    with edge_client(stack) as client:
        usable(client, stack, narrow["secret"])
        usable(client, stack, wide["secret"])
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{stack.ports.edge}", credentials) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)

        def run(secret: str, max_tokens: int) -> list:
            return list(mesh.Generate(chat("Tell me about the mesh.", max_tokens=max_tokens, model=RELAY_MODEL),
                                      metadata=(("authorization", f"Bearer {secret}"),), timeout=60))
        assert run(narrow["secret"], 8)[-1].finish_reason, "a generation within the key's window runs"
        with pytest.raises(grpc.RpcError) as refused:
            run(narrow["secret"], 500)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens per minute" in refused.value.details(), refused.value.details()
        assert run(wide["secret"], 500)[-1].finish_reason, "the tenant's other key is not held to it"


def test_a_killed_gateway_loses_at_most_one_flush_interval(postgres_stack):
    stack, _ = postgres_stack
    tenant, _, secret = new_key(stack)
    auth = (("authorization", f"Bearer {secret}"),)
    start = int(time.time()) - 60
    finished: list[float] = []

    async def load(until: float) -> None:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = mesh_pb2_grpc.InferenceMeshStub(channel)

            async def worker(n: int) -> None:
                index = 0
                while time.monotonic() < until:
                    index += 1
                    request = chat(f"kill test {n}-{index}", max_tokens=4, model=RELAY_MODEL)
                    try:
                        async for _ in stub.Generate(request, metadata=auth, timeout=30):
                            pass
                    except grpc.aio.AioRpcError:
                        return
                    finished.append(time.monotonic())
            await asyncio.gather(*(worker(n) for n in range(4)))

    gateway = stack.processes["gateway"]
    killed_at: list[float] = []

    async def kill_later() -> None:
        await asyncio.sleep(3.5)
        gateway.popen.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    async def both() -> None:
        await asyncio.gather(load(time.monotonic() + 6), kill_later())
    asyncio.run(both())
    stack.start_gateway(0)  # the edge's only gateway: the report is read through it
    done = [t for t in finished if t <= killed_at[0]]
    recorded = sum(r["num_model_requests"] for r in report(stack, "completions", tenant, start))
    lost = len(done) - recorded
    window = [t for t in done if t > killed_at[0] - FLUSH_S - 0.5]
    print(f"killed gateway: {len(done)} requests answered, {recorded} recorded, {lost} lost; "
          f"{len(window)} answered in its last flush interval")
    assert len(done) > 20 and recorded <= len(finished), "never more records than answers"
    assert lost <= len(window), "lost at most what the last flush had not written"


def test_a_router_that_is_down_is_unavailable_on_the_admin_api(postgres_stack):
    """The replica list relays the router: without it the admin API says UNAVAILABLE (what to retry), not a
    500. Called on the gateway as the edge relays it (its secret, the verified scope): through Envoy, the health
    check would take the router-less gateway out of rotation first and the answer would be Envoy's own."""
    from services.common.wire import ADMIN_SCOPE, EDGE_SECRET_HEADER, JWT_SCOPE_HEADER

    stack, _ = postgres_stack
    relayed = ((EDGE_SECRET_HEADER, stack._edge_secret), (JWT_SCOPE_HEADER, ADMIN_SCOPE))
    with grpc.insecure_channel(stack.gateway_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        listed = admin.ListReplicas(router_pb2.ListReplicasRequest(), metadata=relayed, timeout=10)
        assert listed.replicas, "the router lists its replicas"
        stack.processes["router"].stop()
        try:
            with pytest.raises(grpc.RpcError) as down:
                admin.ListReplicas(router_pb2.ListReplicasRequest(), metadata=relayed, timeout=10)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value
            assert "router" in down.value.details(), down.value.details()
        finally:
            stack.start_router()


def test_tenant_credentials_are_refused_on_the_admin_api(stack):
    admin = admin_client(stack)
    key = admin.call("GET", "/tenants", token=KEYS["tenant-a"])
    assert key.status_code == 403 and "tenant's credential" in key.json()["error"]["message"], key.text
    tenant_jwt = admin.call("GET", "/tenants", token=mint_jwt(stack.pki, "tenant-a"))
    assert tenant_jwt.status_code == 401 and "mesh:admin" in tenant_jwt.json()["error"]["message"], tenant_jwt.text
    nothing = admin.call("GET", "/tenants", token="")
    assert nothing.status_code == 401, nothing.text
    forged = admin.call("GET", "/tenants", token="", headers={"x-mesh-jwt-scope": "mesh:admin",
                                                              "x-mesh-edge-secret": "guess"})
    assert forged.status_code == 401, "identity headers from a client are dropped at the edge"
    other_key = mint_admin_jwt(stack.pki, "x", scope="mesh:read")
    assert admin.call("GET", "/tenants", token=other_key).status_code == 403


def test_the_grpc_admin_api_at_the_edge_takes_the_same_credentials(stack):
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{stack.ports.edge}", credentials) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        token = (("authorization", f"Bearer {mint_admin_jwt(stack.pki, 'grpc-admin')}"),)
        tenants = admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=token, timeout=10)
        assert "tenant-a" in {t.id for t in tenants.tenants}
        with pytest.raises(grpc.RpcError) as refused:
            admin.ListTenants(admin_pb2.ListTenantsRequest(),
                              metadata=(("authorization", f"Bearer {KEYS['tenant-a']}"),), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as duplicate:
            admin.CreateTenant(admin_pb2.CreateTenantRequest(id="tenant-a", tier="standard"), metadata=token,
                               timeout=10)
        assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("method, path, body, status, words", [
    ("POST", "/tenants", {"id": "tenant-a", "tier": "standard"}, 409, "already exists"),
    ("POST", "/tenants", {"id": "admin-new", "tier": "gold"}, 400, "unknown tier 'gold'"),
    ("POST", "/tenants", {"id": "admin-new", "tier": "standard", "color": "red"}, 400, "color"),
    ("POST", "/tenants", {"id": "x' OR '1'='1", "tier": "standard"}, 400, "not a valid name"),
    ("POST", "/tenants/tenant-a/keys", {"labels": {"team": "x" * 300}}, 400, "at most 256"),
    ("POST", "/tenants/tenant-a/keys", {"tenant": "tenant-b"}, 400, "differs from the path"),
    ("POST", "/tenants/nobody/keys", {}, 404, "no tenant 'nobody'"),
    ("POST", "/keys/key_nope/revoke", None, 404, "no key 'key_nope'"),
    ("PATCH", "/tenants/tenant-a", {"tier": "gold"}, 400, "unknown tier"),
    ("GET", "/keys?tenant=tenant-a&sort=desc", None, 400, "unknown query parameters: sort"),
])
def test_bad_input_is_refused_clearly_and_nothing_is_written(stack, method, path, body, status, words):
    admin = admin_client(stack)
    before = admin.ok("GET", "/tenants"), admin.ok("GET", "/keys?include_revoked=true")
    answer = admin.call(method, path, body)
    assert answer.status_code == status and words in answer.json()["error"]["message"], answer.text
    assert (admin.ok("GET", "/tenants"), admin.ok("GET", "/keys?include_revoked=true")) == before


def test_a_body_that_is_not_json_is_refused(stack):
    admin = admin_client(stack)
    answer = admin.http.post(f"https://localhost:{stack.ports.edge}/admin/v1/tenants", content=b"{not json",
                             headers={"authorization": f"Bearer {admin.token}", "content-type": "application/json"})
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]["message"], answer.text

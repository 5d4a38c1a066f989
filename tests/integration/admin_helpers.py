"""What the admin-plane tests share: an admin client at the edge, and the wait for a change to be in force on
every replica, read from the replicas themselves (each one's mesh_admin_directory_revision against the
database's) rather than slept for."""

from __future__ import annotations

import ssl
import time
import urllib.request
import uuid
from dataclasses import dataclass

import httpx

from services.admin.store import AdminStore
from tools.stack import LocalStack

# Every gateway and the rate-limit service poll the database this often (AdminDatabase.poll_s, the default):
# a change is in force everywhere within it, plus one reload.
POLL_S = 1.0
BOUND_S = POLL_S + 0.75
FLUSH_S = 1.0  # UsageSettings.flush_s: how often a gateway writes its usage records, the default the stacks run with


@dataclass
class Admin:
    stack: LocalStack
    token: str
    http: httpx.Client

    def call(self, method: str, path: str, body: dict | None = None, token: str | None = None,
             headers: dict | None = None) -> httpx.Response:
        sent = {"authorization": f"Bearer {self.token if token is None else token}"} if token != "" else {}
        return self.http.request(method, f"https://localhost:{self.stack.ports.edge}/admin/v1{path}", json=body,
                                 headers={**sent, **(headers or {})})

    def ok(self, method: str, path: str, body: dict | None = None) -> dict:
        answer = self.call(method, path, body)
        assert answer.status_code in (200, 201), answer.text
        return answer.json()

    def tenant_with_keys(self, prefix: str, tier: str, tier_limits: dict, *keys: dict) -> tuple[str, list[dict]]:
        """A fresh tenant on `tier` (put with `tier_limits`) and one key per body in `keys`: (tenant, issued)."""
        tenant = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.ok("PUT", f"/tiers/{tier}", tier_limits)
        self.ok("POST", "/tenants", {"id": tenant, "tier": tier})
        return tenant, [self.ok("POST", f"/tenants/{tenant}/keys", body) for body in keys]


def admin_client(stack: LocalStack) -> Admin:
    from tools.pki import mint_admin_jwt

    return Admin(stack, mint_admin_jwt(stack.pki, "test-admin"), edge_client(stack))


def edge_client(stack: LocalStack) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(stack.pki.ca_cert)), timeout=10)


def models_status(client: httpx.Client, stack: LocalStack, key: str) -> int:
    return client.get(f"https://localhost:{stack.ports.edge}/v1/models",
                      headers={"authorization": f"Bearer {key}"}).status_code


def wait_for(client: httpx.Client, stack: LocalStack, key: str, status: int, timeout_s: float = 10.0) -> float:
    """Seconds until the edge answers /v1/models with `status` for `key`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if models_status(client, stack, key) == status:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"the edge did not answer {status} for the key within {timeout_s} s")


def _served_revision(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    found = [line for line in text.splitlines() if line.startswith("mesh_admin_directory_revision ")]
    assert found, f"no mesh_admin_directory_revision on metrics port {metrics_port}"
    return int(float(found[0].rsplit(" ", 1)[1]))


def in_force(stack: LocalStack, timeout_s: float = BOUND_S + 3.0) -> float:
    """Seconds until every gateway and the rate-limit service serve the database's current revision."""
    store = AdminStore.open(stack.admin_database_url)
    try:
        wanted = store.revision()
    finally:
        store.close()
    ports = [metrics for _, metrics in stack.ports.gateway_ports()] + [stack.ports.ratelimit_metrics]
    started = time.monotonic()
    while True:
        behind = [port for port in ports if _served_revision(port) < wanted]
        if not behind:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, \
            f"metrics ports {behind} still serve a revision before {wanted} after {timeout_s} s"
        time.sleep(0.05)


def usable(client: httpx.Client, stack: LocalStack, key: str) -> float:
    """Seconds until the edge took `key`; returns once every replica serves it."""
    first = wait_for(client, stack, key, 200)
    in_force(stack)
    return first


def new_key(stack: LocalStack) -> tuple[str, str, str]:
    """(tenant, key id, secret) of a fresh tenant on a roomy tier, usable at the edge."""
    tenant, (issued,) = admin_client(stack).tenant_with_keys(
        "usage", "usage-bulk", {"requests_per_minute": 100000, "burst": 10000, "tokens_per_minute": 0,
                                "tokens_per_month": 0}, {})
    with edge_client(stack) as client:
        usable(client, stack, issued["secret"])
    return tenant, issued["key"]["id"], issued["secret"]


def report(stack: LocalStack, kind: str, tenant: str, start: int) -> list[dict]:
    admin = admin_client(stack)
    page = admin.http.get(f"https://localhost:{stack.ports.edge}/v1/organization/usage/{kind}",
                          params={"start_time": start, "bucket_width": "1d", "project_ids": tenant,
                                  "group_by": "api_key_id"},
                          headers={"authorization": f"Bearer {admin.token}"})
    assert page.status_code == 200, page.text
    return [result for bucket in page.json()["data"] for result in bucket["results"]]


def report_once_written(stack: LocalStack, kind: str, tenant: str, start: int, requests: int) -> list[dict]:
    """The report once it counts `requests` requests (the writers flush every FLUSH_S), or as it stands after a
    few flush intervals: the assertions that follow say what is missing."""
    deadline = time.monotonic() + FLUSH_S * 4 + 2
    while True:
        rows = report(stack, kind, tenant, start)
        if sum(r["num_model_requests"] for r in rows) >= requests or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)

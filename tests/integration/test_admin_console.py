"""The admin console (services/admin/console) in a real headless Chromium (Debian's, driven by Playwright) through
the real Envoy and gateways: sign in with an admin JWT, create a tenant and a key, use the key at the edge, see
its usage appear, revoke it, see it refused; the router's replicas are listed."""

from __future__ import annotations

import ssl
import time
import uuid

import grpc
import httpx
import pytest

from inference_mesh.v1 import mesh_pb2_grpc
from tests.conftest import LLM, chat, debian_tool
from tests.integration.admin_helpers import in_force, models_status, report_once_written, usable
from tools.pki import mint_admin_jwt

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = debian_tool("chromium", "chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def test_an_admin_manages_a_key_from_the_console_and_sees_its_usage(stack, browser, tmp_path):
    edge = f"https://localhost:{stack.ports.edge}"
    tenant = f"console-{uuid.uuid4().hex[:8]}"
    # The local CA is not Chromium's: the test trusts the edge's certificate for this context only.
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.set_default_timeout(15000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(f"{edge}/admin/console")

    page.fill("#token", "not-a-token")
    page.click("#sign-in")
    page.wait_for_function("document.querySelector('#login-error').textContent.length > 0")
    assert page.is_hidden("#console"), "a wrong token does not open the console"

    page.fill("#token", mint_admin_jwt(stack.pki, "console-test"))
    page.click("#sign-in")
    page.wait_for_selector("#console", state="visible")
    page.wait_for_selector('#replicas tbody tr')
    assert "yes" in page.inner_text("#replicas"), "the router's ready replicas are listed"
    # A tier's terms, batch terms included (tests/conftest.py TIERS["batch-terms"]).
    terms = [cell.strip() for cell in page.locator('#tiers tr[data-tier="batch-terms"] td').all_inner_texts()]
    assert terms == ["batch-terms", "100000", "10000", "unlimited", "unlimited", "1", "unlimited", "50%", "2", "1"], \
        terms

    page.fill("#new-tenant-id", tenant)
    page.select_option("#new-tenant-tier", "bulk")
    page.click("#create-tenant")
    page.wait_for_selector(f'#tenants tr[data-tenant="{tenant}"]')
    page.select_option("#key-tenant", tenant)
    page.fill("#key-label", "team=console")
    page.click("#create-key")
    page.wait_for_selector("#new-key", state="visible")
    secret = page.inner_text("#new-secret").strip()
    assert secret.startswith("mk_")
    key_row = page.locator("#keys tbody tr", has_text=tenant)
    assert key_row.count() == 1 and "team=console" in key_row.inner_text()
    key_id = key_row.get_attribute("data-key")

    with httpx.Client(verify=ssl.create_default_context(cafile=str(stack.pki.ca_cert)), timeout=10) as client:
        usable(client, stack, secret)
        start = int(time.time()) - 60
        credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{stack.ports.edge}", credentials) as channel:
            chunks = list(mesh_pb2_grpc.InferenceMeshStub(channel).Generate(
                chat("Say hello.", max_tokens=3), metadata=(("authorization", f"Bearer {secret}"),), timeout=120))
        tokens = chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens

        report_once_written(stack, "completions", tenant, start, 1)
        page.click("#refresh-usage")
        usage_row = page.wait_for_selector(f'#usage tr[data-usage="{tenant}/{LLM}"]')
        cells = [cell.inner_text() for cell in usage_row.query_selector_all("td")]
        assert cells[2] == "1" and int(cells[3]) + int(cells[4]) == tokens, cells
        assert tenant in page.inner_text("#usage-chart"), "the tenant has its bar"
        page.screenshot(path=str(tmp_path / "console.png"), full_page=True)

        page.click(f'#keys tr[data-key="{key_id}"] .revoke')
        page.wait_for_selector(f'#keys tr[data-key="{key_id}"]', state="detached")
        in_force(stack)
        assert models_status(client, stack, secret) == 401, "the revoked key is refused at the edge"
    assert problems == [], problems
    context.close()

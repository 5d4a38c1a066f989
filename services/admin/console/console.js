// The admin console: every figure comes from the admin API (/admin/v1, /v1/organization) with the admin JWT the
// person pasted; nothing from a server-side session. Data is put into the page as text nodes only (tenant names
// and labels are people's input).
"use strict";

const state = { token: sessionStorage.getItem("mesh-admin-token") || "" };

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "authorization": `Bearer ${state.token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((answer.error && answer.error.message) || `${method} ${path}: ${response.status}`);
  return answer;
}

function showError(error) {
  document.getElementById("error").textContent = error ? error.message : "";
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace(".000Z", "Z") : "never";
}

// A limit of 0 means none, or for batch limits the deployment's own (services/common/tenants.py, Tier).
function limit(value, none) {
  return Number(value) ? String(value) : none;
}

function tierRow(tier) {
  const row = el("tr", undefined, { "data-tier": tier.name });
  row.append(el("td", tier.name), el("td", tier.requests_per_minute), el("td", tier.burst),
    el("td", limit(tier.tokens_per_minute, "unlimited")), el("td", limit(tier.tokens_per_month, "unlimited")),
    el("td", tier.share_weight || 1), el("td", limit(tier.max_stored_vectors, "unlimited")),
    el("td", `${Math.round((tier.batch_discount || 0) * 100)}%`),
    el("td", limit(tier.max_batch_files, "deployment's")), el("td", limit(tier.max_batches_in_flight, "deployment's")));
  return row;
}

async function loadTenants() {
  const [{ tenants }, { tiers }] = await Promise.all([api("GET", "/admin/v1/tenants"), api("GET", "/admin/v1/tiers")]);
  fill("tenants", tenants.map((tenant) => {
    const row = el("tr", undefined, { "data-tenant": tenant.id });
    row.append(el("td", tenant.id), el("td", tenant.tier), el("td", tenant.suspended ? "suspended" : "active"));
    const toggle = el("button", tenant.suspended ? "Resume" : "Suspend", { class: "suspend" });
    toggle.addEventListener("click", () => act(() => api("PATCH", `/admin/v1/tenants/${encodeURIComponent(tenant.id)}`,
      { suspended: !tenant.suspended })));
    const cell = el("td");
    cell.append(toggle);
    row.append(cell);
    return row;
  }));
  fill("tiers", tiers.map(tierRow));
  document.getElementById("new-tenant-tier").replaceChildren(...tiers.map((t) => el("option", t.name, { value: t.name })));
  document.getElementById("key-tenant").replaceChildren(...tenants.map((t) => el("option", t.id, { value: t.id })));
}

async function loadKeys() {
  const { keys } = await api("GET", "/admin/v1/keys");
  fill("keys", keys.map((key) => {
    const row = el("tr", undefined, { "data-key": key.id });
    row.append(el("td", key.id), el("td", key.tenant), el("td", key.prefix), el("td", when(key.created_at)),
      el("td", when(key.expires_at)), el("td", (key.allowed_models || []).join(", ") || "all"),
      el("td", Object.entries(key.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ")));
    const revoke = el("button", "Revoke", { class: "revoke" });
    revoke.addEventListener("click", () => act(() => api("POST", `/admin/v1/keys/${encodeURIComponent(key.id)}/revoke`)));
    const cell = el("td");
    cell.append(revoke);
    row.append(cell);
    return row;
  }));
}

function chart(results) {
  // One bar per tenant: its tokens (input + output) over the day.
  const totals = new Map();
  for (const r of results) totals.set(r.project_id, (totals.get(r.project_id) || 0) + r.input_tokens + r.output_tokens);
  const entries = [...totals.entries()].sort((a, b) => b[1] - a[1]);
  const most = Math.max(1, ...entries.map(([, v]) => v));
  const svgNs = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("width", "600");
  svg.setAttribute("height", String(24 * entries.length + 4));
  entries.forEach(([tenant, tokens], i) => {
    const bar = document.createElementNS(svgNs, "rect");
    bar.setAttribute("class", "bar");
    bar.setAttribute("x", "160");
    bar.setAttribute("y", String(24 * i + 4));
    bar.setAttribute("height", "18");
    bar.setAttribute("width", String(Math.max(1, (400 * tokens) / most)));
    const label = document.createElementNS(svgNs, "text");
    label.setAttribute("class", "bar-label");
    label.setAttribute("x", "0");
    label.setAttribute("y", String(24 * i + 17));
    label.textContent = `${tenant}: ${tokens} tokens`;
    svg.append(bar, label);
  });
  document.getElementById("usage-chart").replaceChildren(svg);
}

async function loadUsage() {
  const start = Math.floor(Date.now() / 1000) - 86400;
  const page = await api("GET", `/v1/organization/usage/completions?start_time=${start}&bucket_width=1d&limit=2` +
    "&group_by=project_id&group_by=model");
  const costs = await api("GET", `/v1/organization/costs?start_time=${start}&limit=2&group_by=project_id`);
  const results = page.data.flatMap((bucket) => bucket.results);
  const cost = new Map();
  for (const r of costs.data.flatMap((bucket) => bucket.results)) {
    cost.set(r.project_id, (cost.get(r.project_id) || 0) + r.amount.value);
  }
  const merged = new Map();
  for (const r of results) {
    const id = `${r.project_id}\u0000${r.model}`;
    const m = merged.get(id) || { ...r, num_model_requests: 0, input_tokens: 0, output_tokens: 0, mesh_cache_hits: 0,
      mesh_tokens_saved: 0, mesh_failed_or_cancelled: 0 };
    for (const k of ["num_model_requests", "input_tokens", "output_tokens", "mesh_cache_hits", "mesh_tokens_saved",
      "mesh_failed_or_cancelled"]) m[k] += r[k];
    merged.set(id, m);
  }
  const rows = [...merged.values()].sort((a, b) => (a.project_id + a.model).localeCompare(b.project_id + b.model));
  fill("usage", rows.map((r) => {
    const row = el("tr", undefined, { "data-usage": `${r.project_id}/${r.model}` });
    row.append(el("td", r.project_id), el("td", r.model), el("td", r.num_model_requests), el("td", r.input_tokens),
      el("td", r.output_tokens), el("td", r.mesh_cache_hits), el("td", r.mesh_tokens_saved),
      el("td", r.mesh_failed_or_cancelled), el("td", (cost.get(r.project_id) || 0).toFixed(6)));
    return row;
  }));
  chart(rows);
}

async function loadReplicas() {
  const { replicas } = await api("GET", "/admin/v1/replicas");
  fill("replicas", (replicas || []).map((r) => {
    const row = el("tr", undefined, { "data-replica": r.name });
    row.append(el("td", r.name), el("td", r.pool), el("td", r.gpu_class), el("td", r.ready ? "yes" : "no"),
      el("td", r.in_flight || 0), el("td", r.triton_pending || 0), el("td", (r.queue_ms || 0).toFixed(1)),
      el("td", r.draining ? "yes" : "no"));
    return row;
  }));
}

async function refresh() {
  await Promise.all([loadTenants(), loadKeys(), loadUsage(), loadReplicas()]);
}

async function act(change) {
  try {
    const result = await change();
    showError(null);
    await refresh();
    return result;
  } catch (error) {
    showError(error);
    return null;
  }
}

async function signIn() {
  state.token = document.getElementById("token").value.trim() || state.token;
  try {
    await api("GET", "/admin/v1/tenants");
  } catch (error) {
    document.getElementById("login-error").textContent = error.message;
    return;
  }
  sessionStorage.setItem("mesh-admin-token", state.token);
  document.getElementById("login").hidden = true;
  document.getElementById("console").hidden = false;
  document.getElementById("who").textContent = "signed in";
  await act(async () => null);
  setInterval(() => loadReplicas().catch(showError), 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-in").addEventListener("click", signIn);
  document.getElementById("tenant-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(() => api("POST", "/admin/v1/tenants", { id: document.getElementById("new-tenant-id").value,
      tier: document.getElementById("new-tenant-tier").value }));
  });
  document.getElementById("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const tenant = document.getElementById("key-tenant").value;
    const label = document.getElementById("key-label").value.trim();
    const body = {};
    if (label) {
      const [name, ...value] = label.split("=");
      body.labels = { [name]: value.join("=") };
    }
    const created = await act(() => api("POST", `/admin/v1/tenants/${encodeURIComponent(tenant)}/keys`, body));
    if (created) {
      document.getElementById("new-secret").textContent = created.secret;
      document.getElementById("new-key").hidden = false;
    }
  });
  document.getElementById("refresh-usage").addEventListener("click", () => act(async () => null));
  if (state.token) signIn();
});

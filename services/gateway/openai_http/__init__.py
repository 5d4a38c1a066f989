"""The OpenAI-compatible HTTP API (chat completions, completions, embeddings, models) served by each gateway
beside its gRPC port and reached through Envoy's public listener: a thin adapter over the gateway's core
(services/gateway/core.py), so auth, tenants, budgets, cache, routing and failover are the mesh's own.
docs/openai-api.md documents the mapping and the mesh's extensions."""

"""Rate-limit and token-budget metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUEST_DECISIONS = Counter("mesh_ratelimit_decisions_total", "Envoy rate-limit decisions by tier and result",
                            ["tier", "result"])
UNRESOLVED = Counter("mesh_ratelimit_unresolved_descriptors_total",
                     "Descriptors naming no known tenant (the gateway then refuses the call as unauthenticated)")
BUDGET_DECISIONS = Counter("mesh_token_budget_decisions_total", "Token-budget admissions by tier and result",
                           ["tier", "result"])
TOKENS_CHARGED = Counter("mesh_token_budget_charged_tokens_total", "Tokens charged to budgets", ["tier"])
REDIS_ERRORS = Counter("mesh_ratelimit_redis_errors_total", "Failed Redis calls, by API", ["api"])
DECISION_SECONDS = Histogram("mesh_ratelimit_decision_duration_seconds", "Time to answer, by API", ["api"],
                             buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
RESERVATIONS_EXPIRED = Counter("mesh_token_budget_reservations_expired_total",
                               "Token reservations given back unsettled after their ttl (their gateway went away)")

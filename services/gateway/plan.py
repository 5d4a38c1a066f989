"""What one request will do, decided once right after validation: the model (a group's member, with the version
this caller gets), the deadline, the session and prefix the router keeps on one replica, the headers every hop
carries and the cache scope. The orchestration below reads the plan; nothing downstream decides again."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from inference_mesh.v1 import cache_pb2, mesh_pb2, models_pb2
from services.common.errors import REQUEST_ID
from services.common.wire import COST_HEADER, PRIORITY_HEADER, SHARE_WEIGHT_HEADER, TENANT_HEADER
from services.gateway.auth import Caller
from services.gateway.routing_hints import with_version


@dataclass
class Delivered:
    """What the model has reported so far (its prompt, counted by its own tokenizer): a stream cancelled before
    its usage arrives is still charged the prompt it made the model read."""

    prompt_tokens: int = 0


@dataclass(frozen=True)
class RequestPlan:
    caller: Caller
    model: models_pb2.ModelInfo
    # Filled in as the request runs (cache status, placement, degradations) and sent with its last response.
    metadata: mesh_pb2.ResponseMetadata
    timeout_s: float
    affinity: str = ""
    # For the router's fair queues under overload: batch or interactive, and the tokens this may cost.
    priority: mesh_pb2.Priority.ValueType = mesh_pb2.PRIORITY_INTERACTIVE
    cost: int = 1
    delivered: Delivered = field(default_factory=Delivered)

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return ((TENANT_HEADER, self.caller.tenant), ("x-request-id", self.metadata.request_id),
                (SHARE_WEIGHT_HEADER, f"{self.caller.share_weight:g}"),
                (PRIORITY_HEADER, "batch" if self.priority == mesh_pb2.PRIORITY_BATCH else "interactive"),
                (COST_HEADER, str(self.cost)))

    @property
    def discount(self) -> float:
        """The share of the price not charged: the caller's tier's batch discount, for work at batch priority."""
        return self.caller.discount_at(self.priority)

    @property
    def cache_scope(self) -> cache_pb2.CacheScope:
        # The version is part of the scope: a cached answer is only ever one of the version this caller is routed to.
        return cache_pb2.CacheScope(tenant=self.caller.tenant, model=self.model.name, model_version=self.model.version)


def plan_request(caller: Caller, model: models_pb2.ModelInfo, request_id: str, timeout_s: float, *,
                 session: str = "", affinity: str = "", group: str = "",
                 priority: mesh_pb2.Priority.ValueType = mesh_pb2.PRIORITY_INTERACTIVE, cost: int = 1) -> RequestPlan:
    """The version is sticky on the session, else on the tenant: the same key the router uses for a fallback."""
    model = with_version(model, session or caller.tenant)
    metadata = mesh_pb2.ResponseMetadata(request_id=request_id or uuid.uuid4().hex, model=model.name,
                                         tenant=caller.tenant, model_group=group)
    REQUEST_ID.set(metadata.request_id)
    return RequestPlan(caller, model, metadata, timeout_s, affinity, priority, max(1, cost))


# A chat template's own tokens: a default system prompt (SmolLM2's is ~15 tokens) and each turn's role markers.
TEMPLATE_TOKENS, _TOKENS_PER_TURN = 32, 4


def estimated_cost(request: mesh_pb2.GenerateRequest) -> int:
    """A generation's worst case before it runs, in tokens: the prompt (no tokenizer here: at most one token per 3
    characters, which over-counts English text) and its template, plus everything the answer may take. Budgets
    reserve it; the router's fair queues charge it; both are corrected by what was really used."""
    chars = sum(len(m.content) for m in request.messages)
    return chars // 3 + TEMPLATE_TOKENS + _TOKENS_PER_TURN * len(request.messages) + request.max_tokens

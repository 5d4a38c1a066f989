"""Token budgets: admit a generation only while the tenant has tokens left; charge its real usage after."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter

from inference_mesh.v1 import mesh_pb2, quota_pb2, quota_pb2_grpc
from services.common.background import BackgroundCalls
from services.common.errors import MeshError
from services.gateway.auth import Caller

log = logging.getLogger(__name__)
BUDGET_UNAVAILABLE = Counter("mesh_gateway_budget_unavailable_total",
                             "Budget checks the rate-limit service did not answer, by what the gateway did",
                             ["decision"])
_CACHE_HITS = (mesh_pb2.CACHE_STATUS_EXACT_HIT, mesh_pb2.CACHE_STATUS_SEMANTIC_HIT)
_WINDOW = {quota_pb2.BUDGET_WINDOW_MINUTE: "tokens per minute", quota_pb2.BUDGET_WINDOW_MONTH: "tokens per month"}


class TokenBudgets:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, charge_timeout_s: float, fail_open: bool) -> None:
        self._stub = quota_pb2_grpc.TokenBudgetStub(channel)
        self._timeout_s = timeout_s
        self._charge_timeout_s = charge_timeout_s
        self._fail_open = fail_open
        self._background = BackgroundCalls()

    async def admit(self, caller: Caller) -> None:
        """Raises RESOURCE_EXHAUSTED (with a retry-after hint) when a window is spent."""
        try:
            reply = await self._stub.Check(quota_pb2.BudgetCheckRequest(tenant=caller.tenant), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            BUDGET_UNAVAILABLE.labels("allowed" if self._fail_open else "refused").inc()
            log.warning("token budget unavailable", extra={"status": exc.code().name, "error": exc.details(),
                                                           "fail_open": self._fail_open})
            if self._fail_open:
                return
            raise MeshError(grpc.StatusCode.UNAVAILABLE,
                            "token budgets cannot be checked right now (rate-limit service down); retry") from exc
        if reply.allowed:
            return
        retry_after = max(1, math.ceil(reply.retry_after.ToTimedelta().total_seconds()))
        raise MeshError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"token budget: tenant {caller.tenant!r} ({caller.tier} tier) has used its {reply.limit} "
            f"{_WINDOW.get(reply.exhausted, 'tokens')}; retry after {retry_after} s",
            (("retry-after", str(retry_after)),))

    def charge(self, caller: Caller, tokens: int) -> None:
        if tokens > 0:
            self._background.start(self._charge(caller, tokens))

    async def _charge(self, caller: Caller, tokens: int) -> None:
        try:
            await self._stub.Charge(quota_pb2.BudgetChargeRequest(tenant=caller.tenant, tokens=tokens),
                                    timeout=self._charge_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("token charge lost", extra={"tenant": caller.tenant, "tokens": tokens,
                                                    "status": exc.code().name})

    async def drain(self) -> None:
        await self._background.drain()


async def metered(budgets: TokenBudgets, caller: Caller,
                  chunks: AsyncIterator[mesh_pb2.GenerateChunk]) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    """Charges what the stream really used: the final usage, or the tokens sent before a cancel or failure.

    A cache hit is free: it used no model time.
    """
    streamed = 0
    total: int | None = None
    try:
        async for chunk in chunks:
            streamed += 1
            if chunk.finish_reason:
                total = 0 if chunk.metadata.cache_status in _CACHE_HITS else chunk.usage.total_tokens
            yield chunk
    finally:
        budgets.charge(caller, streamed if total is None else total)

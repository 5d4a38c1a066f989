"""Token budgets: admit a generation only while the tenant has tokens left; charge its real usage after."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf.duration_pb2 import Duration
from prometheus_client import Counter

from inference_mesh.v1 import mesh_pb2, quota_pb2, quota_pb2_grpc
from services.common.background import BackgroundCalls
from services.common.errors import exhausted, unavailable
from services.gateway.auth import Caller
from services.gateway.plan import Delivered

log = logging.getLogger(__name__)
BUDGET_UNAVAILABLE = Counter("mesh_gateway_budget_unavailable_total",
                             "Budget checks the rate-limit service did not answer, by what the gateway did",
                             ["decision"])
# Answers that used no model time: free for budgets, saved tokens in usage records.
CACHE_HITS = (mesh_pb2.CACHE_STATUS_EXACT_HIT, mesh_pb2.CACHE_STATUS_SEMANTIC_HIT)
# No tokenizer for an embedder's input here: a token per 4 bytes of text, at least one per text.
_BYTES_PER_INPUT_TOKEN = 4

_BUDGETS_DOWN = "token budgets cannot be checked right now (rate-limit service down); retry"


def input_tokens_of(size_bytes: int) -> int:
    """What embedding one text of this size costs (Embed, KServe embeddings, ingest)."""
    return max(1, size_bytes // _BYTES_PER_INPUT_TOKEN)


def input_tokens(texts: Iterable[str]) -> int:
    return sum(input_tokens_of(len(text.encode())) for text in texts)


# A reservation outlives its call's deadline by this much before it expires unsettled.
SETTLE_MARGIN_S = 30.0
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
            reply = await self._stub.Check(quota_pb2.BudgetCheckRequest(tenant=caller.tenant, key_id=caller.key_id),
                                           timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            BUDGET_UNAVAILABLE.labels("allowed" if self._fail_open else "refused").inc()
            log.warning("token budget unavailable", extra={"status": exc.code().name, "error": exc.details(),
                                                           "fail_open": self._fail_open})
            if self._fail_open:
                return
            raise unavailable(_BUDGETS_DOWN) from exc
        if reply.allowed:
            return
        wait_s = max(1, math.ceil(reply.retry_after.ToTimedelta().total_seconds()))
        raise exhausted(f"token budget: tenant {caller.tenant!r} ({caller.tier} tier) has used its {reply.limit} "
                        f"{_WINDOW.get(reply.exhausted, 'tokens')}; retry after {wait_s} s", wait_s)

    async def reserve(self, caller: Caller, tokens: int, ttl_s: float) -> str:
        """Holds a generation's worst case against the tenant's budget before it starts; raises RESOURCE_EXHAUSTED
        (with retry-after) when what is left cannot cover it. The reservation to settle ("" when nothing is held:
        no budget, or the service down and failing open, then the real use is charged at the end)."""
        try:
            reply = await self._stub.Reserve(quota_pb2.BudgetReserveRequest(
                tenant=caller.tenant, key_id=caller.key_id, tokens=tokens,
                ttl=Duration(seconds=max(1, math.ceil(ttl_s)))),
                timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            BUDGET_UNAVAILABLE.labels("allowed" if self._fail_open else "refused").inc()
            log.warning("token budget unavailable", extra={"status": exc.code().name, "error": exc.details(),
                                                           "fail_open": self._fail_open})
            if self._fail_open:
                return ""
            raise unavailable(_BUDGETS_DOWN) from exc
        check = reply.check
        if check.allowed:
            return reply.reservation
        wait_s = max(1, math.ceil(check.retry_after.ToTimedelta().total_seconds()))
        raise exhausted(
            f"token budget: tenant {caller.tenant!r} ({caller.tier} tier) cannot cover this request's worst case of "
            f"{tokens} tokens (prompt + max_tokens) within its {check.limit} {_WINDOW.get(check.exhausted, 'tokens')}"
            f"; retry after {wait_s} s, or ask for fewer max_tokens", wait_s)

    def settle(self, caller: Caller, reservation: str, used: int) -> None:
        """What a generation really used: the rest of its reservation goes back (after the reply)."""
        if reservation:
            self._background.start(self._settle(caller, reservation, used))
        else:
            self.charge(caller, used)

    async def _settle(self, caller: Caller, reservation: str, used: int) -> None:
        try:
            await self._stub.Settle(quota_pb2.BudgetSettleRequest(tenant=caller.tenant, key_id=caller.key_id,
                                                                  reservation=reservation, used_tokens=used),
                                    timeout=self._charge_timeout_s)
        except grpc.aio.AioRpcError as exc:
            # Its reservation expires and gives everything back: the budget loses this use, never more.
            log.warning("token settlement lost", extra={"tenant": caller.tenant, "tokens": used,
                                                        "status": exc.code().name})

    def charge(self, caller: Caller, tokens: int) -> None:
        if tokens > 0:
            self._background.start(self._charge(caller, tokens))

    async def _charge(self, caller: Caller, tokens: int) -> None:
        try:
            await self._stub.Charge(quota_pb2.BudgetChargeRequest(tenant=caller.tenant, key_id=caller.key_id,
                                                                  tokens=tokens),
                                    timeout=self._charge_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("token charge lost", extra={"tenant": caller.tenant, "tokens": tokens,
                                                    "status": exc.code().name})

    async def drain(self) -> None:
        await self._background.drain()


async def metered(budgets: TokenBudgets, caller: Caller, chunks: AsyncIterator[mesh_pb2.GenerateChunk],
                  reservation: str = "", delivered: Delivered | None = None) -> AsyncIterator[mesh_pb2.GenerateChunk]:
    """Settles what the stream really used: the final usage, or, after a cancel or failure, the prompt the model
    read and the tokens it produced (a delta may span tokens: its token_index counts them).

    A cache hit is free: it used no model time.
    """
    produced = 0
    total: int | None = None
    try:
        async for chunk in chunks:
            produced = max(produced + 1, chunk.token_index + 1)
            if chunk.finish_reason:
                total = 0 if chunk.metadata.cache_status in CACHE_HITS else chunk.usage.total_tokens
            yield chunk
    finally:
        prompt = delivered.prompt_tokens if delivered is not None else 0
        budgets.settle(caller, reservation, prompt + produced if total is None else total)

"""Token budgets at the gateway (services/gateway/budgets.py) against a scripted TokenBudget service: what a
caller is told when a window is spent, and what the gateway does when the service does not answer."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from inference_mesh.v1 import quota_pb2
from services.common.errors import MeshError
from services.gateway.auth import Caller
from services.gateway.budgets import TokenBudgets
from tests.unit.fakes import rpc_error

CALLER = Caller("tenant-1", "standard")


class ScriptedBudget:
    """Answers Check and Reserve with what it was given (a reply, or an error to raise) and keeps the requests."""

    def __init__(self, reply=None, error: grpc.aio.AioRpcError | None = None) -> None:
        self.reply, self.error, self.asked = reply, error, []

    async def _answer(self, request, timeout: float):  # noqa: ASYNC109 - the stub's signature
        self.asked.append((request, timeout))
        if self.error is not None:
            raise self.error
        return self.reply

    Check = Reserve = _answer


def _budgets(service: ScriptedBudget, fail_open: bool = False) -> TokenBudgets:
    budgets = TokenBudgets(grpc.aio.insecure_channel("127.0.0.1:9"), 0.2, 1.0, fail_open)
    budgets._stub = service
    return budgets


def _spent(window: quota_pb2.BudgetWindow.ValueType, limit: int, wait_s: float) -> quota_pb2.BudgetCheckReply:
    return quota_pb2.BudgetCheckReply(allowed=False, exhausted=window, limit=limit,
                                      retry_after=Duration(seconds=int(wait_s), nanos=int(wait_s % 1 * 1e9)))


async def test_a_spent_window_is_resource_exhausted_naming_it_with_a_whole_second_hint():
    service = ScriptedBudget(_spent(quota_pb2.BUDGET_WINDOW_MINUTE, 20_000, 2.2))
    with pytest.raises(MeshError) as refused:
        await _budgets(service).admit(CALLER)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.trailing == (("retry-after", "3"),)
    assert "tenant-1" in refused.value.message and "20000 tokens per minute" in refused.value.message
    assert service.asked[0][0].tenant == "tenant-1", "the tenant is the caller's, never the request's"


async def test_a_reservation_that_cannot_cover_the_worst_case_says_what_to_change():
    service = ScriptedBudget(quota_pb2.BudgetReserveReply(check=_spent(quota_pb2.BUDGET_WINDOW_MONTH, 10**6, 60)))
    with pytest.raises(MeshError) as refused:
        await _budgets(service).reserve(CALLER, 5000, 30.0)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ask for fewer max_tokens" in refused.value.message and refused.value.trailing == (("retry-after", "60"),)
    assert service.asked[0][0].tokens == 5000


async def test_an_allowed_reservation_returns_what_settle_names():
    service = ScriptedBudget(quota_pb2.BudgetReserveReply(check=quota_pb2.BudgetCheckReply(allowed=True),
                                                          reservation="r-1"))
    assert await _budgets(service).reserve(CALLER, 100, 30.0) == "r-1"


async def test_without_the_budget_service_the_gateway_refuses_unless_told_to_fail_open():
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with pytest.raises(MeshError) as refused:
        await _budgets(ScriptedBudget(error=down)).admit(CALLER)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "rate-limit service down" in refused.value.message
    await _budgets(ScriptedBudget(error=down), fail_open=True).admit(CALLER)
    assert await _budgets(ScriptedBudget(error=down), fail_open=True).reserve(CALLER, 100, 30.0) == "", \
        "failing open holds nothing: the real use is charged at the end"

"""A tier's batch discount (services/common/tenants.Tier.batch_discount): work at batch priority is recorded at
the discounted price, interactive work at the full one, a cache hit at none."""

from __future__ import annotations

import pytest

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.gateway.auth import Caller
from services.gateway.plan import plan_request
from services.gateway.request_log import GenerationLog, cost_of

MODEL = models_pb2.ModelInfo(name="m", placements=[models_pb2.Placement(pool="cpu", cost_per_1k_tokens=0.002)])
HALF = Caller("t", "batch-terms", batch_discount=0.5)


def test_the_discount_is_the_callers_at_batch_priority_only():
    assert HALF.discount_at(mesh_pb2.PRIORITY_BATCH) == 0.5
    assert HALF.discount_at(mesh_pb2.PRIORITY_INTERACTIVE) == 0.0
    assert Caller("t", "standard").discount_at(mesh_pb2.PRIORITY_BATCH) == 0.0
    assert plan_request(HALF, MODEL, "r1", 10.0, priority=mesh_pb2.PRIORITY_BATCH).discount == 0.5
    assert plan_request(HALF, MODEL, "r2", 10.0).discount == 0.0


def test_cost_of_takes_the_discount_off_the_registry_price():
    assert cost_of(MODEL, "cpu", 1000) == pytest.approx(0.002)
    assert cost_of(MODEL, "cpu", 1000, 0.5) == pytest.approx(0.001)
    assert cost_of(MODEL, "gpu", 1000, 0.5) == 0.0, "a pool the model has no price in"


@pytest.mark.parametrize("discount, cache_status, expected", [
    (0.5, mesh_pb2.CACHE_STATUS_MISS, 0.002 * 30 / 1000 * 0.5),
    (0.0, mesh_pb2.CACHE_STATUS_MISS, 0.002 * 30 / 1000),
    (0.5, mesh_pb2.CACHE_STATUS_EXACT_HIT, 0.0),
])
def test_a_generations_usage_record_carries_the_discounted_cost(discount, cache_status, expected):
    class Written(list):
        record = list.append  # what GenerationLog.write hands its UsageWriter

    written = Written()
    record = GenerationLog("generate", "t", "m", include_text=False, usage=written)  # type: ignore[arg-type]
    record.model_info, record.discount = MODEL, discount
    final = mesh_pb2.GenerateChunk(finish_reason=mesh_pb2.FINISH_REASON_STOP,
                                   usage=mesh_pb2.Usage(prompt_tokens=20, completion_tokens=10),
                                   metadata=mesh_pb2.ResponseMetadata(pool="cpu", cache_status=cache_status))
    record.seen(final)
    record.write()
    (usage,) = written
    assert (usage.input_tokens, usage.output_tokens) == (20, 10) and usage.cost_usd == pytest.approx(expected)

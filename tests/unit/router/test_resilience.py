"""Pure unit tests of the resilience parts: breaker state machine, retry budget and backoff, stream resumption
requests, registry fallbacks and the pools a placement passed over. No servers."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from services.common.breakers import STATE, Breaker, BreakerOpenError, BreakerSettings
from services.common.kserve import InferRequestBuilder
from services.common.retries import Retrier, RetryBudget, RetrySettings
from services.common.stream_progress import RESUME_INPUT, StreamProgress
from services.router.balancer import Balancer
from services.router.registry import Registry
from services.router.replicas import ReplicaSet
from tests.unit.router import REGISTRY

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def state_metric(target: str) -> float:
    return STATE.labels(target)._value.get()


def test_breaker_opens_after_ten_consecutive_faults_only():
    breaker = Breaker("unit-a", BreakerSettings(fail_max=10, reset_timeout_s=60))
    for _ in range(9):
        breaker.admit()
        breaker.record(UNAVAILABLE, "down")
    breaker.admit()
    breaker.record(grpc.StatusCode.OK)  # a success resets the count
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND) * 5:
        breaker.admit()
        breaker.record(code)  # the caller's fault or our own shedding: not the target's
    assert breaker.state == "closed" and state_metric("unit-a") == 0
    for _ in range(10):
        breaker.admit()
        breaker.record(grpc.StatusCode.INTERNAL, "boom")
    assert breaker.state == "open" and state_metric("unit-a") == 2
    assert not breaker.available()
    with pytest.raises(BreakerOpenError, match="circuit open after 10 consecutive failures; next probe in 60 s"):
        breaker.admit()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_half_open_lets_one_probe_through_and_closes_or_reopens():
    clock = FakeClock()
    breaker = Breaker("unit-b", BreakerSettings(fail_max=2, reset_timeout_s=60), clock=clock)
    for _ in range(2):
        breaker.admit()
        breaker.record(UNAVAILABLE)
    clock.now += 59.9
    assert not breaker.available()
    with pytest.raises(BreakerOpenError, match="next probe in 0 s"):
        breaker.admit()
    clock.now += 0.1
    assert breaker.available()
    breaker.admit()  # the probe
    assert breaker.state == "half-open" and state_metric("unit-b") == 1
    with pytest.raises(BreakerOpenError):
        breaker.admit()  # one probe at a time
    breaker.record(UNAVAILABLE)
    assert breaker.state == "open", "a failed probe opens it again"
    clock.now += 30
    with pytest.raises(BreakerOpenError, match="next probe in 30 s"):
        breaker.admit()  # the reset timeout counts from the failed probe
    clock.now += 30
    breaker.admit()
    breaker.abandon()  # the probe's caller went away: the slot is free again
    breaker.admit()
    breaker.record(grpc.StatusCode.OK)
    assert breaker.state == "closed" and state_metric("unit-b") == 0


def test_a_passing_health_check_half_opens_before_the_timeout():
    breaker = Breaker("unit-c", BreakerSettings(fail_max=1, reset_timeout_s=3600))
    breaker.admit()
    breaker.record(UNAVAILABLE)
    assert not breaker.available()
    breaker.healthy()
    assert breaker.available()
    breaker.admit()
    breaker.record(grpc.StatusCode.OK)
    assert breaker.state == "closed"


def test_retry_budget_keeps_retries_within_twenty_percent_plus_the_floor():
    now = [0.0]
    budget = RetryBudget(ratio=0.2, floor_per_s=10.0, window_s=10.0, clock=lambda: now[0])
    requests = retries = 0
    for _ in range(60_000):  # 1,000 requests/s for 60 s, every one failing and wanting a retry
        now[0] += 0.001
        budget.on_request()
        requests += 1
        retries += budget.try_spend()
    reserve = 10.0 * 10.0
    assert retries <= 0.2 * requests + 10.0 * now[0] + reserve
    assert retries / requests < 0.22
    quiet = RetryBudget(ratio=0.2, floor_per_s=0.0, window_s=10.0, clock=lambda: now[0])
    spent = 0
    for _ in range(100):
        quiet.on_request()
        spent += quiet.try_spend()
    assert spent <= 0.2 * 100 + 1


def test_backoff_is_jittered_capped_and_retries_are_bounded():
    retrier = Retrier("unit", RetrySettings(max_retries=3, base_backoff_s=0.025, max_backoff_s=1.0))
    for attempt in range(8):
        pauses = [retrier.backoff_s(attempt) for _ in range(200)]
        assert min(pauses) >= 0.0 and max(pauses) <= min(1.0, 0.025 * 2 ** attempt)
        assert len(set(pauses)) > 100, "full jitter spreads the retries"
    assert [retrier.may_retry(n, UNAVAILABLE) for n in range(4)] == [True, True, True, False]
    assert not retrier.may_retry(0, grpc.StatusCode.INVALID_ARGUMENT)


def _token_response(token: int | None, final: bool = False) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(b"\x01\x00\x00\x00x")
    response.outputs.add(name="token_id", datatype="INT32", shape=[0 if token is None else 1])
    response.raw_output_contents.append(np.array([] if token is None else [token], dtype="<i4").tobytes())
    response.parameters["triton_final_response"].bool_param = final
    return response


def test_stream_progress_builds_the_resume_request():
    request = InferRequestBuilder("llm", "id-1").add_bytes("messages", [b"[]"]).add_array(
        "max_tokens", np.array([8], dtype=np.int32)).build()
    progress = StreamProgress()
    assert not progress.started
    for token in (5, 7, 11):
        progress.delivered(_token_response(token), final=False)
    assert progress.started and progress.resumable and progress.tokens == [5, 7, 11]
    resumed = progress.resume_request(request)
    assert [t.name for t in resumed.inputs] == ["messages", "max_tokens", RESUME_INPUT]
    assert np.frombuffer(resumed.raw_input_contents[2], dtype="<i4").tolist() == [5, 7, 11]
    assert len(request.inputs) == 2, "the original request is left as it was"
    # Resuming a resumed request keeps the earlier tokens first.
    progress.delivered(_token_response(13), final=False)
    again = progress.resume_request(resumed)
    assert np.frombuffer(again.raw_input_contents[-1], dtype="<i4").tolist() == [5, 7, 11, 5, 7, 11, 13]
    no_ids = service_pb2.ModelInferResponse()
    progress.delivered(no_ids, final=False)
    assert not progress.resumable, "a response without a token id cannot be resumed from"


def test_resume_request_in_typed_contents_form():
    request = service_pb2.ModelInferRequest(model_name="llm")
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(8)
    progress = StreamProgress()
    progress.delivered(_token_response(3), final=False)
    resumed = progress.resume_request(request)
    assert not resumed.raw_input_contents
    assert list(resumed.inputs[-1].contents.int_contents) == [3]


def test_registry_fallback_must_be_another_model_of_the_same_kind():
    models = {"llm": {"kind": "generate", "triton_model": "a", "pools": ["cpu"], "fallback": "small"},
              "small": {"kind": "generate", "triton_model": "b", "pools": ["cpu"]},
              "emb": {"kind": "embed", "triton_model": "c", "pools": ["cpu"]}}
    registry = Registry.model_validate({**REGISTRY, "models": models})
    assert registry.fallback_of(registry.models["llm"]).triton_model == "b"
    assert registry.fallback_of(registry.models["small"]) is None
    for fallback in ("emb", "llm", "missing"):
        with pytest.raises(ValueError, match="fallback"):
            Registry.model_validate({**REGISTRY, "models": {**models, "llm": {**models["llm"], "fallback": fallback}}})


async def test_placement_names_the_preferred_pools_it_passed_over():
    registry = Registry.model_validate(REGISTRY)
    replicas = ReplicaSet(registry)
    by_name = {r.name: r for r in replicas.replicas}
    balancer = Balancer(replicas)
    model = registry.models["llm"]
    by_name["c0"].ready_models = {"llm_t"}
    assert balancer.place(model).passed_over == ("a100",), "a100 has a replica, and it is not ready"
    by_name["g0"].ready_models = {"llm_t"}
    assert balancer.place(model).passed_over == ()
    for _ in range(10):
        by_name["g0"].breaker.record(UNAVAILABLE)
    choice = balancer.place(model)
    assert (choice.replica.name, choice.passed_over) == ("c0", ("a100",)), "an open breaker takes it out"
    await replicas.close()

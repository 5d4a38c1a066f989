"""Fair sharing under overload on real Triton: the local registry lets one generation per replica run at a time
(llama.cpp on CPU), so the session stack's one replica is saturated by a few concurrent requests, and what waits,
waits in the router's fair queues (services/router/admission.py)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from tests.conftest import KEYS, chat, fresh_long_prompt, service_metric, wait_for_prompt_evaluation
from tools.processes import free_port


def key(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", KEYS[tenant]),)


def sampled(content: str, max_tokens: int = 6, **kwargs) -> mesh_pb2.GenerateRequest:
    # Sampled and uncached: every request runs on Triton.
    return chat(content, max_tokens=max_tokens, temperature=0.9, cache_mode=mesh_pb2.CACHE_MODE_BYPASS, **kwargs)


class Load:
    """Closed loops of requests per tenant (each keeps `depth` requests outstanding) until stopped; records the
    order in which requests finish."""

    def __init__(self, mesh, requests: dict[str, mesh_pb2.GenerateRequest], depth: int) -> None:
        self._mesh = mesh
        self._requests = requests
        self._depth = depth
        self._stop = threading.Event()
        self.finished: list[str] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(tenant,), daemon=True)
                         for tenant in requests for _ in range(depth)]

    def _loop(self, tenant: str) -> None:
        while not self._stop.is_set():
            try:
                list(self._mesh.Generate(self._requests[tenant], metadata=key(tenant), timeout=120))
            except grpc.RpcError as exc:
                with self._lock:
                    self.errors.append(f"{tenant}: {exc.code().name} {exc.details()}")
                return
            with self._lock:
                if not self._stop.is_set():
                    self.finished.append(tenant)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def wait_for(self, count: int, timeout_s: float = 120) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while len(self.finished) < count:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"only {len(self.finished)} of {count} requests finished"
            time.sleep(0.05)
        return list(self.finished)


def test_service_shares_under_saturation_follow_the_tier_weights(mesh):
    # Same prompt length and max_tokens: the same estimated cost, so shares of requests are shares of tokens.
    requests = {"tenant-heavy": sampled("Name a colour."), "tenant-light": sampled("Name a fruit.")}
    with Load(mesh, requests, depth=4) as load:
        load.wait_for(6)  # past the start, with both tenants' queues full
        skip = len(load.finished)
        done = load.wait_for(skip + 30)[skip:skip + 30]
    shares = Counter(done)
    heavy = shares["tenant-heavy"] / len(done)
    assert heavy == pytest.approx(2 / 3, abs=0.1), f"weights 2:1 gave {shares}"


def test_a_quiet_tenant_does_not_wait_behind_a_flood(mesh):
    with Load(mesh, {"tenant-flood": sampled("Count to ten.")}, depth=8) as load:
        load.wait_for(2)
        started = time.monotonic()
        _ = list(mesh.Generate(sampled("Name a bird."), metadata=key("tenant-quiet"), timeout=60))
        quiet_s = time.monotonic() - started
        finished_meanwhile = len(load.finished) - 2
    # First come, first served it would wait for all 8 of the flooder's; fairly it waits for the one running
    # (and at most one more that the flooder had queued before it arrived).
    assert finished_meanwhile <= 2, f"{finished_meanwhile} of the flooder's requests went first ({quiet_s:.2f} s)"


def test_batch_waits_behind_interactive_and_still_completes(mesh):
    requests = {"tenant-flood": sampled("Name a river.")}
    with Load(mesh, requests, depth=3) as load:
        load.wait_for(1)
        done: dict[str, float] = {}

        def one(name: str, priority: mesh_pb2.Priority.ValueType) -> None:
            list(mesh.Generate(sampled("Name a tree.", priority=priority), metadata=key("tenant-quiet"), timeout=90))
            done[name] = time.monotonic()

        batch = threading.Thread(target=one, args=("batch", mesh_pb2.PRIORITY_BATCH))
        batch.start()
        time.sleep(0.3)
        interactive = threading.Thread(target=one, args=("interactive", mesh_pb2.PRIORITY_INTERACTIVE))
        interactive.start()
        interactive.join(90)
        batch.join(90)
    assert set(done) == {"batch", "interactive"}, "both complete"
    assert done["interactive"] < done["batch"], "the batch request came first but yields to the interactive one"


def _preemptions(stack) -> float:
    return service_metric(stack.ports.router_metrics, "mesh_router_preemptions_total", model="smollm2")


@pytest.fixture(scope="module")
def relaying_gateway(stack) -> Iterator[mesh_pb2_grpc.InferenceMeshStub]:
    """A gateway whose router relays the tokens (the other token path; the stack's gateways take leases)."""
    port, metrics = free_port(), free_port()
    address = stack.start_gateway_as("gateway-relayed", {
        **stack.gateway_env(port, metrics), "MESH_GATEWAY_TOKEN_PATH": "router"})
    with grpc.insecure_channel(address) as channel:
        yield mesh_pb2_grpc.InferenceMeshStub(channel)
    stack.processes.pop("gateway-relayed").stop()


@pytest.mark.parametrize("path", ["lease", "relay"])
def test_an_interactive_request_preempts_a_running_batch_generation_which_resumes_whole(mesh, stack, path,
                                                                                        request):
    """One replica, one generation at a time: a long batch generation holds the only slot. Without preemption an
    interactive request arriving now would wait for all of it; with it the batch attempt is stopped, the
    interactive request runs, and the batch request queues again and resumes from the tokens it had streamed:
    its caller sees one unbroken stream, each token once."""
    through = mesh if path == "lease" else request.getfixturevalue("relaying_gateway")
    before = _preemptions(stack)
    batch_chunks: list[mesh_pb2.GenerateChunk] = []
    done: dict[str, float] = {}
    first_token = threading.Event()

    def run_batch() -> None:
        request = sampled("Write a long story about a lighthouse keeper.", max_tokens=96,
                          priority=mesh_pb2.PRIORITY_BATCH)
        for chunk in through.Generate(request, metadata=key("tenant-quiet"), timeout=120):
            batch_chunks.append(chunk)
            first_token.set()
        done["batch"] = time.monotonic()

    batch = threading.Thread(target=run_batch)
    batch.start()
    assert first_token.wait(60), "the batch generation never started"
    list(through.Generate(sampled("Name a bird."), metadata=key("tenant-quiet"), timeout=60))
    done["interactive"] = time.monotonic()
    batch.join(120)
    assert set(done) == {"batch", "interactive"}, "both complete"
    assert done["interactive"] < done["batch"], "the interactive request waited for the whole batch generation"
    assert _preemptions(stack) >= before + 1
    final = batch_chunks[-1]
    indexes = [c.token_index for c in batch_chunks if c.text]
    assert indexes == sorted(set(indexes)), f"a token streamed twice across the resume: {indexes}"
    assert final.usage.completion_tokens == indexes[-1] + 1 or final.finish_reason == mesh_pb2.FINISH_REASON_STOP


def test_a_preempted_batch_request_frees_its_slot_within_its_prompt_evaluation(mesh, stack):
    """A batch request with a ~1500-token prompt (seconds of llama.cpp prefill here) holds the only slot. The
    interactive request that preempts it starts inside that evaluation (triton_models/smollm2/1/abortable_eval.py),
    not after it; the batch request queues again and still completes."""
    before = _preemptions(stack)
    outcome: dict[str, mesh_pb2.GenerateChunk] = {}

    def run_batch() -> None:
        request = sampled(fresh_long_prompt(), max_tokens=2, priority=mesh_pb2.PRIORITY_BATCH)
        outcome["batch"] = list(mesh.Generate(request, metadata=key("tenant-quiet"), timeout=120))[-1]

    batch = threading.Thread(target=run_batch)
    batch.start()
    wait_for_prompt_evaluation(stack)
    time.sleep(0.3)  # part of the way in, past its first chunk
    started = time.monotonic()
    first = next(iter(mesh.Generate(sampled("Name a bird."), metadata=key("tenant-quiet"), timeout=60)))
    waited = time.monotonic() - started
    assert first.text or first.finish_reason, first
    batch.join(120)
    assert waited < 3.0, f"the interactive request's first token took {waited:.1f} s: it waited for the batch prompt"
    assert _preemptions(stack) >= before + 1
    assert outcome["batch"].usage.completion_tokens >= 1, outcome["batch"]


def test_a_request_that_cannot_start_in_time_is_refused_at_once_with_retry_after(mesh, stack):
    with Load(mesh, {"tenant-flood": sampled("Name a city.", max_tokens=16)}, depth=10) as load:
        load.wait_for(2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            list(mesh.Generate(sampled("Name a lake."), metadata=key("tenant-flood"), timeout=0.6))
        took = time.monotonic() - started
        with grpc.insecure_channel(stack.router_address) as channel:
            queues = router_pb2_grpc.RouterAdminStub(channel).ListReplicas(router_pb2.ListReplicasRequest(),
                                                                          timeout=5).queues
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert took < 0.4, f"refused after {took:.2f} s: not at once"
    assert "deadline" in refused.value.details()
    assert int(dict(refused.value.trailing_metadata())["retry-after"]) >= 1
    flooded = [q for q in queues if q.tenant == "tenant-flood"]
    assert flooded and flooded[0].interactive >= 1 and flooded[0].triton_model == "smollm2", queues


def test_concurrent_streams_cannot_spend_past_a_token_budget(mesh):
    # 300 tokens per minute (the small-budget tier); each request may cost its prompt + 40 tokens: reserved
    # before it starts, so only as many start as the budget covers, whatever their concurrency.
    budget, refill_per_s = 300, 300 / 60
    results: list[tuple[str, int]] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        try:
            chunks = list(mesh.Generate(sampled(f"Write a long story, part {index}.", max_tokens=40),
                                        metadata=key("tenant-reserve"), timeout=120))
            outcome = ("ok", chunks[-1].usage.total_tokens)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "worst case" in exc.details() and "300 tokens per minute" in exc.details(), exc.details()
            assert int(dict(exc.trailing_metadata())["retry-after"]) >= 1
            outcome = ("refused", 0)
        with lock:
            results.append(outcome)

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    elapsed = time.monotonic() - started
    used = sum(tokens for outcome, tokens in results if outcome == "ok")
    admitted = sum(1 for outcome, _ in results if outcome == "ok")
    assert len(results) == 12 and 1 <= admitted < 12, results
    assert used <= budget + refill_per_s * elapsed, (used, elapsed, results)

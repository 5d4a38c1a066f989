"""Redis, Milvus, the cache service and the router killed and restarted under load: success wherever a path
exists, a precise status where none does, circuit breakers that open and close, recovery within seconds."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, retrieval_pb2
from services.common.kserve import InferRequestBuilder
from tests.conftest import AUTH, EMBEDDER, chat, service_metric
from tools.stack import LocalStack, StackPorts

RECOVERY_S = 15.0
HIT_PROMPT = chat("Name a colour of the sky.", max_tokens=8, temperature=0.0)


@dataclass
class Outcome:
    at: float
    kind: str
    code: str                  # "OK" or the status name
    detail: str = ""
    cache_status: int = 0


@dataclass
class Load:
    """Four callers sending a mix of cached generations, fresh embeddings and searches until stopped."""

    address: str
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _serial: itertools.count = field(default_factory=itertools.count)

    def _call(self, mesh: mesh_pb2_grpc.InferenceMeshStub, kind: str) -> Outcome:
        started = time.monotonic()
        try:
            if kind == "generate_hit":
                chunks = list(mesh.Generate(HIT_PROMPT, metadata=AUTH, timeout=30))
                return Outcome(started, kind, "OK", cache_status=chunks[-1].metadata.cache_status)
            if kind == "embed":
                answer = mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=[f"text {next(self._serial)}"]),
                                    metadata=AUTH, timeout=10)
                return Outcome(started, kind, "OK", cache_status=answer.metadata.cache_status)
            mesh.Search(retrieval_pb2.SearchRequest(query=f"volcano lava {next(self._serial)}", top_k=2),
                        metadata=AUTH, timeout=10)
            return Outcome(started, kind, "OK")
        except grpc.RpcError as exc:
            return Outcome(started, kind, exc.code().name, exc.details() or "")

    def _run(self, kinds: list[str]) -> None:
        with grpc.insecure_channel(self.address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            for kind in itertools.cycle(kinds):
                if self._stop.is_set():
                    return
                self.outcomes.append(self._call(mesh, kind))
                time.sleep(0.02)

    def start(self) -> Load:
        # A caller per kind, so that a slow kind (a search waiting on a reconnect) cannot starve the others.
        for kinds in (["generate_hit"], ["embed"], ["search"], ["embed", "search"]):
            thread = threading.Thread(target=self._run, args=(kinds,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def between(self, start: float, end: float) -> dict[str, list[Outcome]]:
        by_kind: dict[str, list[Outcome]] = defaultdict(list)
        for outcome in self.outcomes:
            if start <= outcome.at < end:
                by_kind[outcome.kind].append(outcome)
        return by_kind

    def hold(self, since: float, kinds: list[str], at_least_s: float, each: int = 3) -> float:
        """Keeps a fault in place at least `at_least_s`, and until every kind has `each` answers started after
        `since` (at most 20 s more: a machine shared with other tests answers slowly); returns the time."""
        time.sleep(at_least_s)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(len(self.between(since, math.inf)[k]) < each for k in kinds):
            time.sleep(0.2)
        return time.monotonic()

    def recovered_at(self, kind: str, since: float, ok=lambda o: o.code == "OK") -> float:
        """When `kind` answered well again after `since` (inf while it has not), waiting up to RECOVERY_S."""
        deadline = time.monotonic() + RECOVERY_S
        while time.monotonic() < deadline:
            good = [o.at for o in self.outcomes if o.kind == kind and o.at >= since and ok(o)]
            if good:
                return min(good)
            time.sleep(0.2)
        return float("inf")


def seen(load: Load, kind: str, since: float) -> str:
    """What `kind` got since `since`, for failure messages: counts by status and cache status."""
    tally = Counter(f"{o.code}/{mesh_pb2.CacheStatus.Name(o.cache_status)}" for o in load.outcomes
                    if o.kind == kind and o.at >= since)
    return ", ".join(f"{k} x{v}" for k, v in tally.most_common(6))


def failures(outcomes: list[Outcome]) -> list[str]:
    return [f"{o.code}: {o.detail}" for o in outcomes if o.code != "OK"]


@pytest.fixture(scope="module")
def deps(tmp_path_factory, tenants_file):
    mesh = LocalStack(tmp_path_factory.mktemp("chaos-deps"), StackPorts.free(1, gateways=1), tenants_file=tenants_file,
                      with_edge=False)
    mesh.start()
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        gateway = mesh_pb2_grpc.InferenceMeshStub(channel)
        gateway.UpsertDocuments(iter([retrieval_pb2.UpsertDocumentsRequest(documents=[retrieval_pb2.Document(
            id="geo/volcano", text="Volcanoes erupt lava, ash and gases where magma reaches the surface.")])]),
            metadata=AUTH, timeout=120)
        list(gateway.Generate(HIT_PROMPT, metadata=AUTH, timeout=60))  # the cached answer the load replays
    load = Load(mesh.gateway_address).start()
    yield mesh, load
    load.stop()
    mesh.stop()


def breaker_state(stack: LocalStack, target: str) -> float:
    return service_metric(stack.ports.gateway_metrics, "mesh_breaker_state", target=target)


def test_redis_killed_and_restarted_under_load(deps):
    stack, load = deps
    time.sleep(2.0)
    stack.processes["redis"].kill()
    killed = time.monotonic()
    held = load.hold(killed, ["generate_hit", "embed", "search"], 3.0)
    stack.start_redis()
    restarted = time.monotonic()
    window = load.between(killed, held)
    # Without Redis every request still has a path: generation and embeddings skip the cache, search needs none.
    for kind in ("generate_hit", "embed", "search"):
        assert window[kind] and not failures(window[kind]), (kind, failures(window[kind])[:3])
    assert any(o.cache_status == mesh_pb2.CACHE_STATUS_UNAVAILABLE for o in window["generate_hit"])
    back = load.recovered_at("embed", restarted, lambda o: o.code == "OK" and
                             o.cache_status != mesh_pb2.CACHE_STATUS_UNAVAILABLE)
    assert back - restarted < RECOVERY_S, \
        f"the cache did not come back after Redis restarted: {seen(load, 'embed', restarted)}"


def test_milvus_killed_and_restarted_under_load(deps):
    stack, load = deps
    stack.processes["milvus"].kill()
    killed = time.monotonic()
    held = load.hold(killed + 1.0, ["generate_hit", "embed", "search"], 3.0)
    window = load.between(killed + 1.0, held)
    assert window["search"] and all(o.code == "UNAVAILABLE" and o.detail for o in window["search"]), \
        "search without Milvus must fail fast with UNAVAILABLE and say why"
    for kind in ("generate_hit", "embed"):
        assert window[kind] and not failures(window[kind]), (kind, failures(window[kind])[:3])
    stack.start_milvus()
    restarted = time.monotonic()
    assert load.recovered_at("search", restarted) - restarted < RECOVERY_S, \
        f"search did not recover: {seen(load, 'search', restarted)}"


def test_router_killed_and_restarted_under_load_breaker_opens_and_closes(deps):
    stack, load = deps
    # The cached answer must be in the cache (Redis was restarted empty above): wait for a fresh exact hit.
    assert load.recovered_at("generate_hit", time.monotonic(),
                             lambda o: o.cache_status == mesh_pb2.CACHE_STATUS_EXACT_HIT) < math.inf
    stack.processes["router"].kill()
    killed = time.monotonic()
    deadline = killed + 10
    while breaker_state(stack, "router") != 2:  # open after 10 consecutive failures
        assert time.monotonic() < deadline, f"the gateway's router breaker did not open: {seen(load, 'embed', killed)}"
        time.sleep(0.2)
    opened = time.monotonic()
    held = load.hold(opened, ["generate_hit", "embed", "search"], 2.0)
    window = load.between(killed + 0.5, held)
    # Cached answers need no router; fresh embeddings and searches (their query embedding) do.
    assert window["generate_hit"] and not failures(window["generate_hit"])
    assert all(o.cache_status == mesh_pb2.CACHE_STATUS_EXACT_HIT for o in window["generate_hit"])
    for kind in ("embed", "search"):
        assert window[kind] and all(o.code == "UNAVAILABLE" and o.detail for o in window[kind]), kind
    fast = load.between(opened, held)["embed"]
    assert any("circuit open" in o.detail for o in fast), "an open breaker fails fast and says so"
    # A stock Triton client streaming through the gateway's KServe endpoint gets the same precise status.
    with grpc.insecure_channel(stack.gateway_address) as channel, pytest.raises(grpc.RpcError) as refused:
        request = InferRequestBuilder("smollm2-135m-instruct").add_bytes("messages", [b"[]"]).build()
        list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]), metadata=AUTH,
                                                                                 timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "circuit open" in refused.value.details()
    stack.start_router()
    restarted = time.monotonic()
    back = load.recovered_at("embed", restarted)
    assert back - restarted < RECOVERY_S, \
        f"requests did not succeed again after the router restarted: {seen(load, 'embed', restarted)}"
    deadline = time.monotonic() + RECOVERY_S
    while breaker_state(stack, "router") != 0:
        assert time.monotonic() < deadline, "the router breaker did not close after the router came back"
        time.sleep(0.2)
    assert load.recovered_at("search", restarted) - restarted < RECOVERY_S, seen(load, "search", restarted)


def test_cache_service_killed_breaker_opens_requests_degrade_then_recover(deps):
    stack, load = deps
    stack.processes["cache"].kill()
    killed = time.monotonic()
    deadline = killed + 15
    while breaker_state(stack, "cache") != 2:
        assert time.monotonic() < deadline, f"the gateway's cache breaker did not open: {seen(load, 'embed', killed)}"
        time.sleep(0.2)
    held = load.hold(killed, ["generate_hit", "embed"], 3.0)
    window = load.between(killed, held)
    for kind in ("generate_hit", "embed"):
        assert window[kind] and not failures(window[kind]), (kind, failures(window[kind])[:3])
    stack.start_cache()
    restarted = time.monotonic()
    while breaker_state(stack, "cache") != 0:
        assert time.monotonic() - restarted < RECOVERY_S, \
            f"the cache breaker did not close after the restart: {seen(load, 'embed', restarted)}"
        time.sleep(0.2)
    # Served from the cache again. Asked here rather than read off the load: with the cache down its cached
    # generations became real ones, which queue behind Triton's other work for seconds on two cores.
    with grpc.insecure_channel(stack.gateway_address) as channel:
        chunks = list(mesh_pb2_grpc.InferenceMeshStub(channel).Generate(HIT_PROMPT, metadata=AUTH, timeout=30))
    assert chunks[-1].metadata.cache_status == mesh_pb2.CACHE_STATUS_EXACT_HIT, seen(load, "generate_hit", restarted)

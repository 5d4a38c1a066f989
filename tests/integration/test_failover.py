"""Two Triton replicas: load spreads; a stopped replica leaves rotation within 10 s; requests keep succeeding."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from tests.conftest import AUTH, EMBEDDER
from tools.stack import LocalStack, StackPorts


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory, tenants_file):
    # Only the embedder is loaded: it starts in seconds and is enough to see routing.
    mesh = LocalStack(tmp_path_factory.mktemp("failover"), StackPorts.free(2, gateways=1), tenants_file=tenants_file,
                      triton_models=["minilm"], with_edge=False, with_cache=False, with_retrieval=False)
    mesh.start()
    yield mesh
    mesh.stop()


def replica_states(stack) -> dict[str, bool]:
    with grpc.insecure_channel(stack.router_address) as channel:
        answer = router_pb2_grpc.RouterAdminStub(channel).ListReplicas(router_pb2.ListReplicasRequest(), timeout=5)
    return {r.name: r.ready for r in answer.replicas}


def test_stopped_replica_leaves_rotation_and_requests_keep_succeeding(two_replicas):
    stack = two_replicas
    assert replica_states(stack) == {"triton-cpu-0": True, "triton-cpu-1": True}
    served: Counter[str] = Counter()
    failures: list[str] = []
    calls = [0, 0, 0, 0]   # calls each worker has finished
    stop = threading.Event()

    def load(worker: int) -> None:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            while not stop.is_set():
                try:
                    answer = mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["keep going"]),
                                        metadata=AUTH, timeout=10)
                    served[answer.metadata.replica] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                calls[worker] += 1

    def calls_in_flight_finished(since: list[int]) -> None:
        # A call the stopped replica answered just before it died may still be on its way back through router
        # and gateway (a clean CI run once counted one after the replica had left rotation): each worker finishing
        # a later call means every call in flight at `since` has been counted.
        deadline = time.monotonic() + 10
        while any(now <= then for now, then in zip(calls, since, strict=True)):
            assert time.monotonic() < deadline, "a worker made no call for 10 s"
            time.sleep(0.05)

    workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(2.0)
        assert served["triton-cpu-0"] > 0 and served["triton-cpu-1"] > 0, served
        stack.processes["triton-1"].kill()
        killed_at = time.monotonic()
        while replica_states(stack)["triton-cpu-1"]:
            assert time.monotonic() - killed_at < 10, "the stopped replica is still in rotation after 10 s"
            time.sleep(0.2)
        calls_in_flight_finished(list(calls))
        before = served["triton-cpu-1"]
        time.sleep(2.0)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not failures, failures[:5]
    assert served["triton-cpu-1"] == before, "requests still went to the stopped replica"
    assert replica_states(stack) == {"triton-cpu-0": True, "triton-cpu-1": False}

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
    stop = threading.Event()

    def load() -> None:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            while not stop.is_set():
                try:
                    answer = mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["keep going"]),
                                        metadata=AUTH, timeout=10)
                    served[answer.metadata.replica] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    workers = [threading.Thread(target=load) for _ in range(4)]
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
        before = served["triton-cpu-1"]
        time.sleep(2.0)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not failures, failures[:5]
    assert served["triton-cpu-1"] == before, "requests still went to the stopped replica"
    assert replica_states(stack) == {"triton-cpu-0": True, "triton-cpu-1": False}

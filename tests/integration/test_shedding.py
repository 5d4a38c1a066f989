"""Load shedding: a gateway at its in-flight bound refuses at once with RESOURCE_EXHAUSTED and a retry hint."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc

from inference_mesh.v1 import mesh_pb2_grpc
from tests.conftest import AUTH, KEYS, chat
from tools.processes import free_port, wait_grpc_serving
from tools.stack import start_service


@contextmanager
def gateway(stack, name: str, max_in_flight: int, tenant_share: float) -> Iterator[mesh_pb2_grpc.InferenceMeshStub]:
    """A gateway of the stack's own with a small in-flight bound, and a stub to it."""
    port = free_port()
    env = {**stack.gateway_env(port, free_port()), "MESH_GATEWAY_MAX_IN_FLIGHT": str(max_in_flight),
           "MESH_GATEWAY_TENANT_SHARE_OF_IN_FLIGHT": str(tenant_share)}
    process = start_service("services.gateway", name, env, stack.run_dir / f"{name}.log")
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", process, 30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield mesh_pb2_grpc.InferenceMeshStub(channel)
    finally:
        process.stop()


def test_a_gateway_at_capacity_sheds_at_once_and_recovers(stack):
    with gateway(stack, "gateway-shedding", 2, 1.0) as mesh:
        def call(i: int) -> tuple[str, float, dict]:
            started = time.monotonic()
            try:
                list(mesh.Generate(chat(f"Count to {i + 30}.", max_tokens=48, temperature=0.5), metadata=AUTH,
                                   timeout=120))
                return "OK", time.monotonic() - started, {}
            except grpc.RpcError as exc:
                return exc.code().name, time.monotonic() - started, {
                    "details": exc.details(), **dict(exc.trailing_metadata() or ())}

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(call, range(8)))
        shed = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
        assert {o[0] for o in outcomes} == {"OK", "RESOURCE_EXHAUSTED"}, outcomes
        assert len([o for o in outcomes if o[0] == "OK"]) >= 2
        for _, seconds, extra in shed:
            assert seconds < 1.0, "shed at once, not after queueing"
            assert "at capacity (2 requests in flight)" in extra["details"] and extra["retry-after"] == "1"
        assert call(99)[0] == "OK", "capacity comes back when the work is done"


def test_one_tenant_cannot_hold_every_place_of_a_gateway(stack):
    """Slow or many calls of one tenant used to be able to take all of a gateway's places (512, shared): each
    tenant now holds at most its share (here 25 % of 8), and another tenant still gets in."""
    with gateway(stack, "gateway-shares", 8, 0.25) as mesh:
        def call(i: int, metadata=AUTH) -> tuple[str, str]:
            try:
                list(mesh.Generate(chat(f"Count to {i + 40}.", max_tokens=48, temperature=0.5),
                                   metadata=metadata, timeout=120))
                return "OK", ""
            except grpc.RpcError as exc:
                return exc.code().name, exc.details()

        with ThreadPoolExecutor(7) as pool:
            flood = [pool.submit(call, i) for i in range(6)]
            time.sleep(0.3)
            other = pool.submit(call, 99, (("x-api-key", KEYS["tenant-b"]),))
            outcomes = [f.result() for f in flood]
            assert other.result() == ("OK", ""), "another tenant gets a place while one floods"
        refused = [details for code, details in outcomes if code == "RESOURCE_EXHAUSTED"]
        assert len([o for o in outcomes if o[0] == "OK"]) >= 2 and len(refused) >= 3, outcomes
        assert all("'tenant-a' has 2 requests in flight" in d and "25% of 8" in d for d in refused), refused

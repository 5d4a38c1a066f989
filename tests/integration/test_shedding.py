"""Load shedding: a gateway at its in-flight bound refuses at once with RESOURCE_EXHAUSTED and a retry hint."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from inference_mesh.v1 import mesh_pb2_grpc
from tests.conftest import AUTH, chat
from tools.processes import free_port, wait_grpc_serving
from tools.stack import start_service


def test_a_gateway_at_capacity_sheds_at_once_and_recovers(stack):
    port = free_port()
    env = {**stack.gateway_env(port, free_port()), "MESH_GATEWAY_MAX_IN_FLIGHT": "2"}
    process = start_service("services.gateway", "gateway-shedding", env, stack.run_dir / "gateway-shedding.log")
    try:
        wait_grpc_serving(f"127.0.0.1:{port}", process, 30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)

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
    finally:
        process.stop()

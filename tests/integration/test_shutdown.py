"""SIGTERM: NOT_SERVING at once, new calls refused, the in-flight stream finishes, the process exits cleanly."""

from __future__ import annotations

import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.conftest import AUTH, chat
from tools.processes import free_port, wait_grpc_serving
from tools.stack import start_service


def test_gateway_drains_streams_on_sigterm(stack, tenants_file, tmp_path):
    port = free_port()
    gateway = start_service("services.gateway", "gateway-drain", {
        "MESH_GATEWAY_PORT": str(port),
        "MESH_GATEWAY_ROUTER_ADDRESS": stack.router_address,
        "MESH_GATEWAY_TENANTS_FILE": str(tenants_file),
        "MESH_GATEWAY_DRAIN_DELAY_S": "3",
        "MESH_GATEWAY_METRICS_PORT": "0",
    }, tmp_path / "gateway.log")
    try:
        address = f"127.0.0.1:{port}"
        wait_grpc_serving(address, gateway, 30)
        with grpc.insecure_channel(address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            stream = mesh.Generate(chat("Describe a forest in detail.", max_tokens=60, temperature=0.0),
                                   metadata=AUTH, timeout=60)
            first = next(stream)
            gateway.popen.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 2
            status = health_pb2.HealthCheckResponse.SERVING
            while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = list(stream)
        assert rest[-1].finish_reason == mesh_pb2.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 60
        assert first.text + "".join(c.text for c in rest)
        assert gateway.popen.wait(30) == 0
    finally:
        gateway.stop()

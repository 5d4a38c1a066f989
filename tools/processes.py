"""Child processes with logs, readiness waits and bounded stops (used by the stack, tests and benches)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class MissingPartError(RuntimeError):
    """A part of the stack is not installed; the message says what to run."""


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that is free now and stays free until a server binds it.

    Ports come from below the kernel's ephemeral range: a port bound to 0 comes from that range, and any outgoing
    connection (Milvus opens dozens) can take it in the gap between this check and the server's bind.
    """
    low, _ = _ephemeral_range()
    span_start = 20000 if low > 21000 else 1024
    for _ in range(200):
        port = random.randrange(span_start, low)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port between {span_start} and {low}")


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc: children that started sessions of their own escape killpg."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class ManagedProcess:
    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        # A session of its own: Ctrl-C on `make up` reaches us once, and we stop the children in order.
        self.popen = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def ensure_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 25.0) -> None:
        """SIGTERM to the process and everything it started, then SIGKILL to whatever is left."""
        tree = descendants(self.popen.pid)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            _signal_all(tree, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_s)
        deadline = time.monotonic() + 10
        while any(_exists(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill(tree)
        self._log.close()

    def kill(self, tree: list[int] | None = None) -> None:
        tree = descendants(self.popen.pid) if tree is None else tree
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        _signal_all(tree, signal.SIGKILL)
        self.popen.wait(10)


def wait_http_ok(url: str, process: ManagedProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.ensure_alive()
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{process.name}: {url} not ready after {timeout_s:.0f} s; log:\n{process.log_tail()}")


def wait_grpc_serving(address: str, process: ManagedProcess, timeout_s: float,
                      credentials: grpc.ChannelCredentials | None = None) -> None:
    """credentials: for a server that requires mTLS (the internal admin identity's)."""
    deadline = time.monotonic() + timeout_s
    with (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            process.ensure_alive()
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{process.name} at {address} not SERVING after {timeout_s:.0f} s; "
                       f"log:\n{process.log_tail()}")

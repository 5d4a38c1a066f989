"""A real PostgreSQL server on loopback for the admin database's tests (Debian's postgresql package): its own
data directory, a free port, trust authentication on 127.0.0.1 only, stopped with its process tree."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.processes import ManagedProcess, MissingPartError, free_port

INSTALL = "install Debian's postgresql package (apt-get install postgresql; `make test` does it when run as root)"
# PostgreSQL refuses to run as root: under root the server runs as the package's own user.
SERVER_USER = "postgres"


def postgres_bin() -> Path:
    """The directory of the newest installed server's binaries (initdb, postgres)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    if not found:
        raise MissingPartError(f"PostgreSQL's server is missing: {INSTALL}")
    return found[-1].parent


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser") is None:
        raise MissingPartError("runuser (util-linux) is needed to start PostgreSQL as a non-root user")
    return ["runuser", "-u", SERVER_USER, "--", *argv]


@dataclass
class PostgresServer:
    process: ManagedProcess
    data_dir: Path
    port: int
    database: str = "mesh"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://mesh@127.0.0.1:{self.port}/{self.database}"

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for every client to leave).
        if self.process.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.popen.wait(15)
        self.process.stop(timeout_s=5)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_postgres(log_path: Path, timeout_s: float = 60.0) -> PostgresServer:
    """initdb into a fresh directory, start the server, create the `mesh` database; the caller stops it."""
    import psycopg

    binaries = postgres_bin()
    # Not under pytest's tmp_path: its parents are root's alone, and the server runs as another user.
    data_dir = Path(tempfile.mkdtemp(prefix="mesh-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(data_dir, SERVER_USER, SERVER_USER)
    subprocess.run(_as_server_user([str(binaries / "initdb"), "-D", str(data_dir / "data"), "-U", "mesh",
                                    "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    process = ManagedProcess("postgres", _as_server_user([
        str(binaries / "postgres"), "-D", str(data_dir / "data"), "-p", str(port), "-h", "127.0.0.1",
        "-k", str(data_dir), "-c", "fsync=off", "-c", "max_connections=100"]), log_path)
    server = PostgresServer(process, data_dir, port)
    deadline = time.monotonic() + timeout_s
    while True:
        process.ensure_alive()
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="mesh", dbname="postgres",
                                 autocommit=True, connect_timeout=2) as connection:
                connection.execute("CREATE DATABASE mesh")
            return server
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"PostgreSQL did not accept connections in {timeout_s:.0f} s; log {log_path}:\n"
                                   f"{process.log_tail()}") from None
            time.sleep(0.2)

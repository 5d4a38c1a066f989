"""`make gpu-smoke` on a stock GPU host: only Docker, the NVIDIA container toolkit and Python >= 3.10. Run here
with Python 3.10 in a copy of the files it may use (Makefile, protos, tools, requirements, config): its own environment
and stubs are made, compose's secrets too, and it stops at the first GPU-host check with what to install, having
needed none of the CPU setup (no shared libpython, llama.cpp build or ONNX export)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON_310 = [Path("/root/.pyenv/versions/3.10.13/bin/python"), Path("/usr/bin/python3.10")]


def _python_310() -> str:
    # A pyenv shim answers `which` without running: the interpreters themselves first.
    candidates = [str(p) for p in PYTHON_310 if p.exists()] + [p for p in [shutil.which("python3.10")] if p]
    found = next((c for c in candidates if subprocess.run([c, "--version"], capture_output=True).returncode == 0),
                 None)
    if found is None:
        pytest.fail("no Python 3.10 to run gpu-smoke's host check with: install python3.10 (pyenv install 3.10)")
    return found


def test_gpu_smoke_needs_only_python_3_10_docker_and_the_gpu(tmp_path):
    for name in ("Makefile", "protos", "tools", "requirements", "config"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    (tmp_path / "compose").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # a host without nvidia-smi or docker compose
    plan = subprocess.run(["make", "-n", "gpu-smoke", f"GPU_SMOKE_PYTHON={_python_310()}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    for setup_step in (".venv-triton", "llama", "model.onnx", ".venv/bin", "Py_ENABLE_SHARED"):
        assert setup_step not in plan.stdout, f"gpu-smoke would run the CPU setup ({setup_step})"
    run = subprocess.run(["make", "gpu-smoke", f"GPU_SMOKE_PYTHON={_python_310()}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "gpu-smoke cannot start" in run.stderr and "nvidia-smi not found" in run.stderr, run.stderr[-2000:]
    assert (tmp_path / "compose" / ".env").is_file() and (tmp_path / "run" / "pki" / "ca.pem").is_file()
    assert (tmp_path / "run" / "compose" / "tenants.yaml").is_file(), "compose's own tenant and key, not the dev key"
    version = subprocess.run([str(tmp_path / ".venv-gpu-smoke" / "bin" / "python"), "--version"],
                             capture_output=True, text=True).stdout
    assert version.startswith("Python 3.10"), version

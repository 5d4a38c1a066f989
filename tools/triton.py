"""The real tritonserver from the nvidia-pytriton wheel, started on loopback with the python backend."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml

from services.common.channels import MIN_PING_INTERVAL_MS
from tools.processes import ManagedProcess, MissingPartError, free_port, wait_http_ok

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "triton_models"
SETUP_HINT = "run `make setup` (it creates .venv-triton with nvidia-pytriton, llama-cpp-python and the models)"
REGISTRY_FILE = ROOT / "config" / "registry.yaml"
# Triton accepts the mesh's keepalive pings (see services/common/server.py); compose passes the same flags.
KEEPALIVE_ARGS = ["--grpc-keepalive-permit-without-calls=1",
                  f"--grpc-http2-min-recv-ping-interval-without-data={MIN_PING_INTERVAL_MS}"]


def registry_models(registry_file: Path = REGISTRY_FILE, gpu_class: str = "cpu") -> list[str]:
    """The Triton models the registry places on pools of this GPU class: what a Triton of that pool loads."""
    from services.router.registry import Registry

    registry = Registry.load(registry_file)
    pools = {name for name, pool in registry.pools.items() if pool.gpu_class == gpu_class}
    return sorted({spec.triton_model for spec in registry.models.values() if pools & set(spec.pool_names)})


@dataclass(frozen=True)
class ModelNeeds:
    """A model directory's `needs.yaml`: what it takes beyond Triton, checked before tritonserver starts so a
    missing part is named up front rather than as a load failure deep in Triton's log."""

    python_modules: dict[str, str]  # module in the Triton venv → the package that provides it
    files: list[str]                # relative to the model directory (exports, weights)
    calls: list[str] = field(default_factory=list)  # models it sends requests to (BLS): loaded with it

    @classmethod
    def read(cls, directory: Path) -> ModelNeeds:
        path = directory / "needs.yaml"
        data = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
        return cls(dict(data.get("python_modules", {})), list(data.get("files", [])), list(data.get("calls", [])))


def with_called_models(models: list[str], repository: Path) -> list[str]:
    """The models and, transitively, those they call (a BLS model's engine): what Triton must load."""
    wanted, queue = [], list(models)
    while queue:
        model = queue.pop(0)
        if model not in wanted:
            wanted.append(model)
            queue += ModelNeeds.read(repository / model).calls
    return wanted


def missing_model_parts(models: list[str], repository: Path, site_packages: Path) -> list[str]:
    """What the models' `needs.yaml` name and is not installed; a model without a directory is an error."""
    missing = []
    for model in models:
        directory = repository / model
        if not (directory / "config.pbtxt").is_file():
            raise MissingPartError(f"model {model!r} has no {directory / 'config.pbtxt'}: the registry names a "
                                   "Triton model the repository does not have (see docs/adding-a-model.md)")
        needs = ModelNeeds.read(directory)
        missing += [f"{package} (for {model}, {site_packages / module})"
                    for module, package in needs.python_modules.items() if not (site_packages / module).exists()]
        missing += [f"{model}/{file}" for file in needs.files if not (directory / file).exists()]
    return missing


@dataclass(frozen=True)
class TritonPorts:
    grpc: int
    http: int
    metrics: int

    @classmethod
    def free(cls) -> TritonPorts:
        return cls(free_port(), free_port(), free_port())


class TritonInstall:
    """Locates tritonserver, its libraries and the python-backend stub inside the Triton venv."""

    def __init__(self, venv: Path | None = None) -> None:
        self.venv = venv or Path(os.environ.get("MESH_TRITON_VENV", ROOT / ".venv-triton"))

    @cached_property
    def _python_facts(self) -> tuple[Path, str, str]:
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise MissingPartError(f"Triton environment {self.venv} is missing: {SETUP_HINT}")
        out = subprocess.run(
            [str(python), "-c", "import sysconfig, sys; print(sysconfig.get_paths()['purelib']); "
             "print(sysconfig.get_config_var('LIBDIR')); print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
            check=True, capture_output=True, text=True).stdout.split()
        return Path(out[0]), out[1], out[2]

    @property
    def site_packages(self) -> Path:
        return self._python_facts[0]

    @property
    def server_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    def check(self, models: list[str], repository: Path = MODEL_REPOSITORY) -> None:
        """Triton, and what each model's `needs.yaml` names; else a MissingPartError naming what is not there."""
        site, _, version = self._python_facts
        needed = {
            "tritonserver (nvidia-pytriton)": self.server_dir / "bin" / "tritonserver",
            "python backend stub": self.server_dir / "python_backend_stubs" / version / "triton_python_backend_stub",
        }
        missing = [f"{what} ({path})" for what, path in needed.items() if not path.exists()]
        missing += missing_model_parts(models, repository, site)
        if missing:
            raise MissingPartError(f"missing: {', '.join(missing)}: {SETUP_HINT}")

    def backend_directory(self) -> Path:
        """Triton wants the stub beside the backend library: assemble that folder once under build/."""
        _, _, version = self._python_facts
        target = ROOT / "build" / "triton" / "backends" / "python"
        stub = self.server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not (target / "triton_python_backend_stub").exists():
            target.mkdir(parents=True, exist_ok=True)
            for item in (self.server_dir / "backends" / "python").iterdir():
                if item.is_file():
                    shutil.copy2(item, target / item.name)
            shutil.copy2(stub, target / "triton_python_backend_stub")
        return target.parent

    def environment(self) -> dict[str, str]:
        _, libdir, _ = self._python_facts
        env = dict(os.environ)
        # The stub finds its interpreter through PATH: the Triton venv first, so models import its packages
        # (numpy 1.x, which the stub's tensor code expects) and not whatever the system Python has.
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        # The stub links libpython; a pyenv or other non-system Python keeps it in its own LIBDIR.
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (libdir, str(self.site_packages / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")) if p)
        env.pop("PYTHONPATH", None)
        return env

    def start(self, name: str, ports: TritonPorts, log_path: Path, models: list[str] | None = None,
              repository: Path = MODEL_REPOSITORY, extra_args: list[str] | None = None,
              cpu_threads: int = 0, gpu_layers: int = 0, env: dict[str, str] | None = None) -> ManagedProcess:
        """cpu_threads: the compute threads each model may use (0: the models' config). Replicas sharing a
        host must split its cores: llama.cpp and onnxruntime spin at their barriers, and two replicas with a
        thread per core each ran many times slower than one on 2 cores. gpu_layers: the LLM's layers that
        llama.cpp puts on the GPU (-1: all; needs a CUDA build of llama-cpp-python). env: more variables for
        Triton and its models (e.g. the TensorRT-LLM stand-in's fast mode)."""
        models = with_called_models(models or registry_models(), repository)
        self.check(models, repository)
        argv = [
            str(self.server_dir / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={self.backend_directory()}",
            "--grpc-address=127.0.0.1", f"--grpc-port={ports.grpc}",
            "--http-address=127.0.0.1", f"--http-port={ports.http}",
            "--metrics-address=127.0.0.1", f"--metrics-port={ports.metrics}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=10",
            *KEEPALIVE_ARGS,
            "--log-verbose=0",
        ]
        # Explicit control: only the named models load, not every folder of the repository.
        argv += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
        environment = self.environment() | (env or {})
        if cpu_threads:
            environment["MESH_MODEL_CPU_THREADS"] = str(cpu_threads)
        if gpu_layers:
            environment["MESH_MODEL_GPU_LAYERS"] = str(gpu_layers)
        return ManagedProcess(name, argv + (extra_args or []), log_path, env=environment)


# Triton's HTTP port has no TLS: every API on it but health (what probes and readiness checks read) needs a header
# only the deployment knows. The mesh itself calls Triton over gRPC with mTLS. The categories are Triton's own
# (server src/restricted_features.h, RESTRICTED_CATEGORY_NAMES; checked against the tritonserver here).
RESTRICTED_HTTP_APIS = ("inference", "model-repository", "metadata", "model-config", "shared-memory", "statistics",
                        "trace", "logging")
RESTRICTED_HTTP_HEADER = "x-mesh-restricted"


def restricted_http_arg(key: str) -> str:
    return f"--http-restricted-api={','.join(RESTRICTED_HTTP_APIS)}:{RESTRICTED_HTTP_HEADER}={key}"


def wait_triton_ready(process: ManagedProcess, ports: TritonPorts, timeout_s: float = 120.0) -> None:
    wait_http_ok(f"http://127.0.0.1:{ports.http}/v2/health/ready", process, timeout_s)


def triton_counter(metrics_port: int, name: str) -> float:
    """A counter from a Triton's Prometheus endpoint, summed over its label sets."""
    from tools.metrics import metric_sum

    return metric_sum(metrics_port, name)

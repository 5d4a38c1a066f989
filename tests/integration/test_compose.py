"""The GPU stack's files, checked without Docker or GPUs: the compose file per profile (`docker-compose config`,
Debian's docker-compose), every Triton model config against Triton's model config proto (the CPU models and the
TensorRT-LLM templates filled for each pool), ensembles and registry pointing at models that exist, and the
compose Envoy config rendered from its settings and accepted by `envoy --mode validate`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.internal_tls import InternalTls
from services.edge.render import render
from services.edge.settings import EdgeSettings
from services.router.registry import Registry
from tests.conftest import debian_tool
from tools.compose_secrets import SECRET_NAMES, write_env
from tools.edge import validate
from tools.fill_trtllm import TrtllmPools, rendered, write
from tools.pki import ensure_pki
from tools.stack import ROOT
from tools.triton import KEEPALIVE_ARGS

COMPOSE = ROOT / "compose"
# Stand-ins for compose/.env (tools/compose_secrets.py makes the real one): compose refuses to start without.
COMPOSE_SECRETS = {name: f"test-{name.lower()}" for name in SECRET_NAMES}
GPU_POOLS = ("a100", "t4")


def docker_compose() -> str:
    return debian_tool("docker-compose", "docker-compose")


def resolved(profile: str) -> dict:
    answer = subprocess.run([docker_compose(), "--profile", profile, "config"], cwd=COMPOSE, capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "MESH_HF_MODELS": "/srv/models", **COMPOSE_SECRETS})
    assert answer.returncode == 0, answer.stderr
    return yaml.safe_load(answer.stdout)


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_is_valid_per_profile(profile):
    config = resolved(profile)
    services = config["services"]
    assert {f"gateway-{i}" for i in (1, 2, 3)} <= set(services)
    for name in ("envoy", "router", "cache", "retrieval", "ratelimit", "redis", "etcd", "minio", "milvus",
                 "prometheus", "grafana", "otel-collector", "triton-cpu"):
        assert name in services, name
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has none"
    for pool in GPU_POOLS:
        triton = services[f"triton-{pool}"]
        assert triton["profiles"] == ["gpu"] and "trtllm" in triton["image"]
        devices = triton["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["device_ids"] and "gpu" in devices[0]["capabilities"]
        assert triton["depends_on"][f"engine-builder-{pool}"]["condition"] == "service_completed_successfully"
    assert set(services["triton-cpu"]["profiles"]) == {"cpu", "gpu"}
    for name in ("triton-cpu", *(f"triton-{pool}" for pool in GPU_POOLS)):
        # Triton must accept the mesh's keepalive pings, or it drops the router's connections (too_many_pings).
        assert set(KEEPALIVE_ARGS) <= set(services[name]["command"]), name
    assert "--storage.tsdb.retention.time=30d" in services["prometheus"]["command"]


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _repository(root: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {path.parent.name: _parse(path) for path in root.glob("*/config.pbtxt")}


def _check_ensembles(models: dict[str, model_config_pb2.ModelConfig]) -> None:
    for name, config in models.items():
        for step in config.ensemble_scheduling.step:
            assert step.model_name in models, f"{name} calls {step.model_name}, which is not in the repository"
            called = models[step.model_name]
            inputs, outputs = {t.name for t in called.input}, {t.name for t in called.output}
            assert set(step.input_map) <= inputs, (name, step.model_name, set(step.input_map) - inputs)
            assert set(step.output_map) <= outputs, (name, step.model_name, set(step.output_map) - outputs)


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trtllm")
    write(out)
    return out


def test_cpu_model_configs_parse_against_tritons_proto():
    models = _repository(ROOT / "triton_models")
    assert {"smollm2", "minilm"} <= set(models)
    assert models["smollm2"].model_transaction_policy.decoupled


@pytest.mark.parametrize("pool", GPU_POOLS)
def test_trtllm_templates_filled_per_pool_parse_and_the_ensemble_is_complete(filled, pool):
    profile = TrtllmPools.load().pools[pool]
    models = _repository(filled / pool)
    name = TrtllmPools.load().model.triton_name
    assert set(models) == {name, "preprocessing", "tensorrt_llm", "postprocessing"}
    _check_ensembles(models)
    engine = models["tensorrt_llm"]
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert engine.backend == "tensorrtllm" and engine.model_transaction_policy.decoupled
    assert params["gpt_model_type"] == "inflight_fused_batching" and params["gpt_model_path"] == f"/engines/{pool}"
    assert engine.max_batch_size == profile.max_batch_size
    # The ensemble speaks the mesh's generation contract: the CPU model's inputs and outputs.
    cpu = _parse(ROOT / "triton_models" / "smollm2" / "config.pbtxt")
    contract_inputs = {t.name for t in cpu.input} - {"resume_tokens"}
    assert {t.name for t in models[name].input} == contract_inputs
    assert {t.name for t in models[name].output} == {t.name for t in cpu.output}
    build = (filled / f"{pool}.env").read_text()
    assert f"DTYPE='{profile.dtype}'" in build and f"MAX_BATCH_SIZE='{profile.max_batch_size}'" in build


def test_pools_differ_as_their_gpus_do():
    pools = TrtllmPools.load().pools
    assert pools["a100"].dtype == "bfloat16" and pools["t4"].dtype == "float16", "Turing has no bf16"
    assert pools["t4"].weight_only_precision == "int8"
    assert pools["a100"].max_batch_size > pools["t4"].max_batch_size


def test_a_missing_template_value_is_an_error_not_a_blank(monkeypatch):
    pools = TrtllmPools.load()
    monkeypatch.setattr("tools.fill_trtllm.values", lambda p, pool: {"model_name": "x"})
    with pytest.raises(KeyError):
        rendered(pools, "a100")


def test_compose_registry_names_models_its_pools_serve(filled):
    registry = Registry.load(ROOT / "config" / "registry.compose.yaml")
    served = {pool: set(_repository(filled / pool)) for pool in GPU_POOLS}
    served["cpu"] = set(_repository(ROOT / "triton_models"))
    for name, spec in registry.models.items():
        for pool in spec.pool_names:
            assert spec.triton_model in served[pool], f"{name}: {spec.triton_model} is not in the {pool} repository"
    assert {p.gpu_class for p in registry.pools.values()} == {"a100", "t4", "cpu"}


def test_compose_envoy_config_is_rendered_from_its_settings_and_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_EDGE_CONFIG_FILE", str(COMPOSE / "envoy" / "edge.yaml"))
    settings = EdgeSettings()
    committed = yaml.safe_load((COMPOSE / "envoy" / "envoy.yaml").read_text())
    assert committed == render(settings), ("re-render: MESH_EDGE_CONFIG_FILE=compose/envoy/edge.yaml "
                                           "python -m services.edge --out compose/envoy/envoy.yaml")
    # Same config with this machine's certificates where the containers mount theirs.
    pki = ensure_pki(tmp_path / "pki")
    internal = InternalTls(cert=str(pki.internal_cert("edge")), key=str(pki.internal_key("edge")),
                           ca=str(pki.internal_ca))
    local = settings.model_copy(update={"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
                                        "client_ca": str(pki.ca_cert), "jwks_file": str(pki.jwks),
                                        "tls": internal})
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(render(local)))
    checked = validate(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_refuses_to_start_without_its_secrets():
    env = {k: v for k, v in os.environ.items() if k not in SECRET_NAMES}
    answer = subprocess.run([docker_compose(), "--profile", "cpu", "config"], cwd=COMPOSE, capture_output=True,
                            text=True, timeout=60, env={**env, "MESH_HF_MODELS": "/srv/models"})
    assert answer.returncode != 0 and "compose_secrets" in answer.stderr, answer.stderr


def test_secrets_file_is_generated_random_and_kept(tmp_path):
    env = tmp_path / ".env"
    assert write_env(env)
    first = env.read_text()
    assert not write_env(env) and env.read_text() == first
    values = dict(line.split("=", 1) for line in first.splitlines())
    assert set(values) == set(SECRET_NAMES) and len(set(values.values())) == len(SECRET_NAMES)
    assert all(len(v) >= 40 for v in values.values()) and env.stat().st_mode & 0o077 == 0


_SECRET_WORDS = ("password", "secret", "token", "access_key", "api_key")


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_static_security_rules_hold_for_compose(profile):
    """The project's own rules (no maintained scanner installs here without a network to its rule feeds): only
    Envoy's TLS port is published beyond loopback, every secret comes from compose/.env, limits' Redis never
    evicts, the images run as non-root."""
    services = resolved(profile)["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert name == "envoy" or str(published).startswith("127.0.0.1:"), (name, port)
        for key, value in (service.get("environment") or {}).items():
            if any(word in key.lower() for word in _SECRET_WORDS):
                assert str(value).startswith("test-") or "${" in str(value) or value in ("", None), (name, key)
    assert "noeviction" in services["redis-state"]["command"]
    raw = (COMPOSE / "docker-compose.yml").read_text() + (COMPOSE / "envoy" / "edge.yaml").read_text()
    for weak in ("change-me", "minioadmin", ":-secret"):
        assert weak not in raw, weak
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "\nUSER " in dockerfile.replace("\r", "") and "mesh-dev-key" not in dockerfile
    assert "config/tenants.yaml" in (ROOT / ".dockerignore").read_text().splitlines()

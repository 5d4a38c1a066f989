"""The GPU stack's files, checked without Docker or GPUs: the compose file per profile (`docker-compose config`,
Debian's docker-compose), every Triton model config against Triton's model config proto (the CPU models and the
TensorRT-LLM repository filled for each pool) with Triton's loading rules for what one model sends another,
the registry pointing at models that exist, and the compose Envoy config rendered from its settings and accepted
by `envoy --mode validate`. The repository itself is loaded and run by tritonserver in test_trtllm_path.py."""

from __future__ import annotations

import json
import os
import re
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
from tools.compose_secrets import SECRET_NAMES, write_env, write_tenants
from tools.edge import validate
from tools.fill_trtllm import UNBUILT, PoolProfile, TrtllmPools, rendered, write
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
                            env={**os.environ, "MESH_HF_MODELS": "/srv/models", **COMPOSE_SECRETS,
                                 "MESH_TENANTS_FILE": "/srv/tenants.yaml"})
    assert answer.returncode == 0, answer.stderr
    return yaml.safe_load(answer.stdout)


@pytest.mark.parametrize("profile", ["gpu", "cpu", *GPU_POOLS])
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
        # One profile per GPU class (gpu: both), so a host never starts a pool it has no GPU for.
        assert triton["profiles"] == services[f"engine-builder-{pool}"]["profiles"] == [pool, "gpu"]
        assert "trtllm" in triton["image"] and triton["ulimits"]["memlock"] == -1 and triton["ulimits"]["stack"]
        assert "curl" not in triton["healthcheck"]["test"], "use what the image has: python3"
        assert services[f"engine-builder-{pool}"]["command"][-2:] == ["/build/build_engine.py", pool]
        # The builder points the pool's repository at its engine; Triton only reads it.
        assert "trtllm-models:/trtllm-models:rw" in services[f"engine-builder-{pool}"]["volumes"]
        assert "trtllm-models:/trtllm-models:ro" in triton["volumes"]
        devices = triton["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["device_ids"] and "gpu" in devices[0]["capabilities"]
        assert triton["depends_on"][f"engine-builder-{pool}"]["condition"] == "service_completed_successfully"
    assert set(services["triton-cpu"]["profiles"]) == {"cpu", "gpu", *GPU_POOLS}
    for name in ("triton-cpu", *(f"triton-{pool}" for pool in GPU_POOLS)):
        # Triton must accept the mesh's keepalive pings, or it drops the router's connections (too_many_pings).
        assert set(KEEPALIVE_ARGS) <= set(services[name]["command"]), name
    assert "--storage.tsdb.retention.time=30d" in services["prometheus"]["command"]


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _repository(root: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {path.parent.name: _parse(path) for path in root.glob("*/config.pbtxt")}


def _check_ensembles(models: dict[str, model_config_pb2.ModelConfig]) -> None:
    """Triton's loading rules for ensembles: every step's model exists with the tensors mapped, and no step takes
    tensors that come from a decoupled model together with tensors from a non-decoupled step ("inputs originated
    from different decoupled models")."""
    for name, config in models.items():
        decoupled_source: dict[str, bool] = {}  # ensemble tensor -> produced by a decoupled step
        for step in config.ensemble_scheduling.step:
            assert step.model_name in models, f"{name} calls {step.model_name}, which is not in the repository"
            called = models[step.model_name]
            inputs, outputs = {t.name for t in called.input}, {t.name for t in called.output}
            assert set(step.input_map) <= inputs, (name, step.model_name, set(step.input_map) - inputs)
            assert set(step.output_map) <= outputs, (name, step.model_name, set(step.output_map) - outputs)
            sources = {decoupled_source[t] for t in step.input_map.values() if t in decoupled_source}
            assert len(sources) < 2, f"{name}: {step.model_name} mixes tensors of decoupled and non-decoupled steps"
            decoupled = called.model_transaction_policy.decoupled or True in sources
            decoupled_source.update({tensor: decoupled for tensor in step.output_map.values()})


def test_the_ensemble_rule_catches_a_decoupled_step_mixed_with_a_plain_one():
    plain, engine = model_config_pb2.ModelConfig(name="pre"), model_config_pb2.ModelConfig(name="engine")
    plain.output.add(name="ids")
    engine.input.add(name="ids")
    engine.output.add(name="out")
    engine.model_transaction_policy.decoupled = True
    post = model_config_pb2.ModelConfig(name="post")
    post.input.add(name="ids")
    post.input.add(name="out")
    ensemble = model_config_pb2.ModelConfig(name="ens")
    for model, inputs, outputs in (("pre", {}, {"ids": "ids"}), ("engine", {"ids": "ids"}, {"out": "out"}),
                                   ("post", {"ids": "ids", "out": "out"}, {})):
        step = ensemble.ensemble_scheduling.step.add(model_name=model)
        step.input_map.update(inputs)
        step.output_map.update(outputs)
    with pytest.raises(AssertionError, match="mixes tensors of decoupled and non-decoupled"):
        _check_ensembles({"pre": plain, "engine": engine, "post": post, "ens": ensemble})


def _sent_to_engine(source: str, function: str) -> set[str]:
    """The tensor names a BLS function of generate/1/model.py puts in its requests to the engine."""
    body = source[source.index(f"def {function}("):]
    body = body[:body.index("\n    def ", 1) if "\n    def " in body[1:] else len(body)]
    return set(re.findall(r'pb_utils\.Tensor\("(\w+)"', body))


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trtllm")
    write(out)
    write(out, standin=True)
    return out


def test_cpu_model_configs_parse_against_tritons_proto():
    models = _repository(ROOT / "triton_models")
    assert {"smollm2", "minilm"} <= set(models)
    assert models["smollm2"].model_transaction_policy.decoupled


@pytest.mark.parametrize("pool", GPU_POOLS)
def test_a_pools_repository_is_the_contract_over_the_engine_by_tritons_rules(filled, pool):
    profile = TrtllmPools.load().pools[pool]
    models = _repository(filled / pool)
    name = TrtllmPools.load().model.triton_name
    assert set(models) == {name, "tensorrt_llm"}
    _check_ensembles(models)
    public, engine = models[name], models["tensorrt_llm"]
    # The public model speaks the mesh's generation contract exactly, without a batch dimension, less the inputs of
    # capabilities its engine lacks (json_schema, tools: the pinned TensorRT-LLM has no guided decoding, and the
    # registry declares neither on GPU placements, so the router never sends them there).
    cpu = _parse(ROOT / "triton_models" / "smollm2" / "config.pbtxt")
    assert [(t.name, t.data_type, list(t.dims)) for t in public.input] == \
        [(t.name, t.data_type, list(t.dims)) for t in cpu.input if t.name not in ("json_schema", "tools")]
    assert [(t.name, t.data_type, list(t.dims)) for t in public.output] == \
        [(t.name, t.data_type, list(t.dims)) for t in cpu.output]
    assert public.max_batch_size == cpu.max_batch_size == 0 and public.model_transaction_policy.decoupled
    # The engine: in-flight batching with a batch dimension, decoupled, a bounded queue.
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert engine.backend == "tensorrtllm" and engine.model_transaction_policy.decoupled
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert engine.max_batch_size == profile.max_batch_size > 0
    assert engine.dynamic_batching.default_queue_policy.max_queue_size == profile.max_queue_size
    assert params["enable_kv_cache_reuse"] == str(profile.kv_cache_reuse).lower()
    # What the BLS model sends, the engine declares; what the engine requires, the BLS model sends.
    source = (filled / pool / name / "1" / "model.py").read_text()
    declared = {t.name for t in engine.input}
    required = {t.name for t in engine.input if not t.optional}
    generation, stop = _sent_to_engine(source, "_engine_request"), _sent_to_engine(source, "_stop_engine")
    assert generation | stop <= declared, (generation | stop) - declared
    assert required <= generation and required <= stop
    assert yaml.safe_load((filled / pool / name / "needs.yaml").read_text())["calls"] == ["tensorrt_llm"]
    build = json.loads((filled / f"{pool}.json").read_text())
    assert (build["dtype"], build["max_batch_size"], build["engines_root"]) == \
        (profile.dtype, profile.max_batch_size, f"/engines/{pool}")
    # Until its builder points it at an engine, the repository names none that exists.
    assert params["gpt_model_path"] == f"/engines/{pool}/{UNBUILT}"


def test_the_standin_serves_the_engines_own_config(filled):
    gpu, standin = _repository(filled / "a100")["tensorrt_llm"], _repository(filled / "standin")["tensorrt_llm"]
    assert standin.backend == "python" and gpu.backend == "tensorrtllm"
    for field in ("input", "output"):
        assert [text_format.MessageToString(t) for t in getattr(standin, field)] == \
            [text_format.MessageToString(t) for t in getattr(gpu, field)]
    assert standin.model_transaction_policy.decoupled and standin.max_batch_size > 0


def test_pools_differ_as_their_gpus_do():
    pools = TrtllmPools.load().pools
    assert pools["a100"].dtype == "bfloat16" and pools["t4"].dtype == "float16", "Turing has no bf16"
    assert pools["t4"].compute_capability == "7.5" and pools["a100"].compute_capability == "8.0"
    assert not (pools["t4"].paged_context_fmha or pools["t4"].kv_cache_reuse or pools["t4"].chunked_context), \
        "TensorRT-LLM has no sm75 kernels for paged context FMHA"
    assert pools["a100"].max_batch_size > pools["t4"].max_batch_size


def test_a_profile_the_gpu_cannot_run_is_refused():
    t4 = TrtllmPools.load().pools["t4"].model_dump()
    with pytest.raises(ValueError, match="Turing"):
        PoolProfile.model_validate({**t4, "paged_context_fmha": True})
    with pytest.raises(ValueError, match="paged context FMHA"):
        PoolProfile.model_validate({**t4, "kv_cache_reuse": True})


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


# What each container may hold of the PKI: its own identity's certificate and key, and the CA certificate.
_IDENTITY = {"envoy": "edge", "router": "router", "cache": "cache", "retrieval": "retrieval", "ratelimit": "ratelimit",
             **{f"gateway-{i}": "gateway" for i in (1, 2, 3)},
             **{f"triton-{pool}": "triton" for pool in ("cpu", *GPU_POOLS)}}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_each_container_holds_only_its_own_key_and_the_ca_certificate(profile):
    """Compose used to mount all of run/pki (the internal CA key, the JWT signing key, the admin key) into every
    service, Envoy and Triton: a compromised model could mint a JWT for any tenant. Now one secret per file, and
    each container is given its own."""
    config = resolved(profile)
    files = {name: Path(secret["file"]).name for name, secret in config["secrets"].items()}
    assert not any("ca-key" in f or "jwt" in f or "mesh-admin" in f or "client" in f for f in files.values()), files
    for name, service in config["services"].items():
        mounted = [volume if isinstance(volume, str) else f"{volume.get('source')}:{volume.get('target')}"
                   for volume in service.get("volumes", [])]
        assert not any("pki" in volume for volume in mounted), (name, mounted)
        held = {files[s["source"] if isinstance(s, dict) else s] for s in service.get("secrets", [])}
        keys = {f for f in held if f.endswith("-key.pem")}
        if name in _IDENTITY:
            identity = _IDENTITY[name]
            assert keys == {f"internal-{identity}-key.pem"} | ({"server-key.pem"} if name == "envoy" else set()), \
                (name, held)
            assert "internal-ca.pem" in held
        else:
            assert not keys, (name, held)


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_every_triton_restricts_its_plaintext_http_apis(profile):
    from tools.triton import restricted_http_arg

    services = resolved(profile)["services"]
    tritons = [name for name in services if name.startswith("triton-")]
    assert tritons
    for name in tritons:
        assert restricted_http_arg(COMPOSE_SECRETS["TRITON_HTTP_KEY"]) in services[name]["command"], name


def test_compose_serves_a_fresh_key_never_the_development_one(tmp_path):
    env = tmp_path / ".env"
    write_env(env)
    tenants = tmp_path / "run" / "tenants.yaml"
    key = write_tenants(tenants, env)
    assert key and key != "mesh-dev-key" and write_tenants(tenants, env) is None, "made once, then kept"
    from services.common.tenants import TenantConfig, hash_key

    config = TenantConfig.load(str(tenants))
    assert [t.api_key_sha256 for t in config.tenants] == [[hash_key(key)]]
    values = dict(line.split("=", 1) for line in env.read_text().splitlines())
    assert values["MESH_API_KEY"] == key and (env.parent / values["MESH_TENANTS_FILE"]).resolve() == tenants
    assert env.stat().st_mode & 0o077 == 0
    raw = (COMPOSE / "docker-compose.yml").read_text()
    assert "config/tenants.yaml" not in raw, "the development tenants (mesh-dev-key) are not compose's default"


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
    # The cache refuses to start a semantic index without WordNet where its settings look for it.
    from services.cache.settings import CacheSettings

    services_stage = dockerfile.split("AS services\n", 1)[1].split("\nFROM ", 1)[0]
    assert "wordnet-base" in services_stage and str(CacheSettings.model_fields["wordnet_dir"].default) == \
        "/usr/share/wordnet"
    assert "config/tenants.yaml" in (ROOT / ".dockerignore").read_text().splitlines()


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_gateways_keep_batch_files_in_minio_as_a_user_allowed_that_bucket_only(profile, monkeypatch):
    """Every gateway replica reads the files another one was sent: they share a MinIO bucket, not a volume. They
    reach it as the user minio-setup makes, whose policy names that bucket alone, never as MinIO's root (which
    also reaches Milvus's data): a compromised gateway cannot read or wipe the vectors."""
    from services.gateway.settings import GatewaySettings

    services = resolved(profile)["services"]
    setup = services["minio-setup"]
    script = setup["command"][0]
    policy = json.loads((COMPOSE / "minio" / "batch-files-policy.json").read_text())
    resources = {resource for statement in policy["Statement"] for resource in statement["Resource"]}
    for i in (1, 2, 3):
        gateway = services[f"gateway-{i}"]
        env = gateway["environment"]
        bucket = env["MESH_GATEWAY_BATCH__S3__BUCKET"]
        assert env["MESH_GATEWAY_BATCH__STORAGE"] == "s3" and env["MESH_GATEWAY_BATCH__S3__ENDPOINT_URL"] == \
            "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == COMPOSE_SECRETS["MESH_BATCH_S3_ACCESS_KEY"] != \
            COMPOSE_SECRETS["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == COMPOSE_SECRETS["MESH_BATCH_S3_SECRET_KEY"]
        assert not {k for k, v in env.items() if "MINIO_ROOT" in k or v in (COMPOSE_SECRETS["MINIO_ROOT_USER"],
                                                                          COMPOSE_SECRETS["MINIO_ROOT_PASSWORD"])}
        assert gateway["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
        assert f"mc mb --ignore-existing mesh/{bucket} " in script
        for key, value in env.items():
            if key.startswith("MESH_GATEWAY_BATCH__"):
                monkeypatch.setenv(key, value)
        assert GatewaySettings().batch.s3.bucket == bucket, "the names are the gateway's settings"
    # `config` prints compose's escaped `$$`: the container's shell gets `$`, its own environment's value.
    assert "/policy.json" in script and 'mc admin user add mesh "$$MESH_BATCH_S3_ACCESS_KEY"' in script
    assert setup["image"].startswith("minio/mc:RELEASE.") and setup["depends_on"]["minio"]["condition"] == \
        "service_healthy"

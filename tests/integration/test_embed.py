"""Embeddings through gateway → router → Triton (onnxruntime, dynamic batching)."""

from __future__ import annotations

import numpy as np

from inference_mesh.v1 import mesh_pb2
from tests.conftest import AUTH, EMBEDDER


def embed(mesh, texts: list[str]) -> np.ndarray:
    # Bypass the cache: these tests are about the model and the batching.
    answer = mesh.Embed(mesh_pb2.EmbedRequest(model=EMBEDDER, texts=texts, cache_mode=mesh_pb2.CACHE_MODE_BYPASS),
                        metadata=AUTH, timeout=60)
    assert answer.dimension == 384
    assert answer.metadata.model == EMBEDDER and answer.metadata.replica
    return np.array([e.values for e in answer.embeddings], dtype=np.float32)


def test_dimension_and_unit_norm(mesh):
    vectors = embed(mesh, ["The quick brown fox.", "Another sentence entirely."])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_paraphrases_score_above_unrelated(mesh):
    a, b, c = embed(mesh, [
        "How do I reset my password?",
        "What are the steps to change my login password?",
        "The recipe needs two cups of flour and an egg.",
    ])
    assert float(a @ b) > float(a @ c) + 0.3, (float(a @ b), float(a @ c))


def test_large_batch_is_split_and_keeps_order(mesh):
    texts = [f"document number {i} talks about topic {i % 7}" for i in range(150)]  # > max_batch_size 64
    batched = embed(mesh, texts)
    singles = np.concatenate([embed(mesh, [texts[i]]) for i in (0, 63, 64, 149)])
    np.testing.assert_allclose(batched[[0, 63, 64, 149]], singles, atol=1e-4)

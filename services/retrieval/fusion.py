"""Reciprocal rank fusion of ranked lists, and the cosine similarity that every fused hit reports.

Fused here rather than by Milvus' hybrid_search: RRF keeps only ranks, and Ask's relevance floor needs each hit's
similarity to the question, which a lexical hit only has once its vector is compared with the query's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: float, weights: Sequence[float]) -> list[
        tuple[str, float]]:
    """Keys by the sum over lists of weight / (k + rank), rank from 1; ties keep the first list's order."""
    if len(rankings) != len(weights):
        raise ValueError(f"{len(rankings)} rankings but {len(weights)} weights")
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def cosine(query: Sequence[float], vectors: Sequence[Sequence[float]]) -> list[float]:
    if not vectors:
        return []
    q = np.asarray(query, dtype=np.float32)
    m = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(m, axis=1) * (np.linalg.norm(q) or 1.0)
    return (m @ q / np.where(norms == 0, 1.0, norms)).tolist()

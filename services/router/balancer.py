"""Replica choice: the first pool (in the model's order) with a ready replica, then least outstanding."""

from __future__ import annotations

import itertools

from services.router.registry import ModelSpec
from services.router.replicas import Replica, ReplicaSet


class NoReplicaError(Exception):
    pass


class LeastOutstandingBalancer:
    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas
        # Breaks ties in turn, so equal loads still spread.
        self._tiebreak = itertools.count()

    def can_serve(self, model: ModelSpec) -> bool:
        return any(r.serves(model.triton_model) for pool in model.pools for r in self._replicas.in_pool(pool))

    def choose(self, model: ModelSpec, exclude: frozenset[str] = frozenset()) -> Replica:
        for pool in model.pools:
            candidates = [r for r in self._replicas.in_pool(pool)
                          if r.serves(model.triton_model) and r.name not in exclude]
            if candidates:
                shift = next(self._tiebreak) % len(candidates)
                return min(candidates[shift:] + candidates[:shift], key=lambda r: r.in_flight)
        raise NoReplicaError(f"no ready replica for Triton model {model.triton_model!r} in pools {model.pools}")

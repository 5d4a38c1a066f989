"""Saved llama.cpp contexts keyed by their tokens: the KV of several long prompt prefixes, not only the last one.

llama-cpp-python's generate() reuses the KV of the longest common prefix with whatever is in the context now.
With several tenants, each with its own long system prompt, the context holds only the last tenant's. This LRU
keeps up to `capacity` snapshots (each the size of its KV cells); before a prompt is evaluated the snapshot with
the longest matching prefix is restored when it beats what is in the context. That bounded memory is why the
mesh's prefix-affinity routing matters: a replica that sees fewer distinct prefixes keeps all of them.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    left, right = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.nonzero(left != right)[0]
    return int(differ[0]) if len(differ) else n


@dataclass
class Snapshot:
    tokens: tuple[int, ...]
    data: ctypes.Array
    size: int


class PrefixStates:
    def __init__(self, capacity: int, min_tokens: int) -> None:
        self.capacity = capacity
        self.min_tokens = min_tokens
        self._snapshots: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def restore_best(self, llm: llama_cpp.Llama, tokens: Sequence[int]) -> int:
        """Loads the snapshot sharing the longest prefix with `tokens` if it beats the live context; returns the
        number of prompt tokens whose KV is now in the context (0 when nothing matched)."""
        live = common_prefix(llm.input_ids[: llm.n_tokens], tokens)
        best, best_length = None, live
        for snapshot in self._snapshots.values():
            length = common_prefix(snapshot.tokens, tokens)
            if length > best_length:
                best, best_length = snapshot, length
        if best is not None and best_length >= self.min_tokens:
            llama_cpp.llama_state_set_data(llm._ctx.ctx, best.data, best.size)
            llm.input_ids[: len(best.tokens)] = best.tokens
            llm.n_tokens = len(best.tokens)
            self._snapshots.move_to_end(best.tokens)
        if best_length >= self.min_tokens:
            self.hits += 1
        else:
            self.misses += 1
        return best_length

    def save(self, llm: llama_cpp.Llama, prompt_length: int) -> None:
        """Snapshots the context after a generation, keyed by the tokens it holds, if the prompt is long enough."""
        if self.capacity <= 0 or prompt_length < self.min_tokens:
            return
        tokens = tuple(int(t) for t in llm.input_ids[: llm.n_tokens])
        # One snapshot per shared prefix, the newest: an older one sharing a long prefix with this one would only
        # take a slot that another prefix needs.
        for key in [k for k in self._snapshots if common_prefix(k, tokens) >= self.min_tokens]:
            del self._snapshots[key]
        size = llama_cpp.llama_state_get_size(llm._ctx.ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(llm._ctx.ctx, buffer, size)
        self._snapshots[tokens] = Snapshot(tokens, buffer, written)
        while len(self._snapshots) > self.capacity:
            self._snapshots.popitem(last=False)

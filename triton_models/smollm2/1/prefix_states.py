"""Saved llama.cpp contexts keyed by their tokens: the KV of several long prompt prefixes, not only the last one.

llama-cpp-python's generate() reuses the KV of the longest common prefix with whatever is in the context now.
With several tenants, each with its own long system prompt, the context holds only the last tenant's. This LRU
keeps up to `capacity` snapshots (each the size of its KV cells); before a prompt is evaluated the snapshot with
the longest reusable prefix (prefill.reusable: whole chunks only) is restored when it beats the live context.
That bounded memory is why the mesh's prefix-affinity routing matters: a replica that sees fewer distinct
prefixes keeps all of them.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
from prefill import common_prefix, reusable


@dataclass
class Snapshot:
    tokens: tuple[int, ...]
    canonical: int  # the leading tokens evaluated in whole chunks: the only ones a later prompt may reuse
    data: ctypes.Array
    size: int


class PrefixStates:
    def __init__(self, capacity: int, min_tokens: int) -> None:
        self.capacity = capacity
        self.min_tokens = min_tokens
        self._snapshots: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()

    def restore_best(self, llm: llama_cpp.Llama, canonical: int, prompt: Sequence[int]) -> tuple[int, int]:
        """Loads the snapshot with the longest reusable prefix of `prompt` if it beats the live context (whose
        first `canonical` tokens are reusable). Returns (tokens reusable now, the context's canonical length)."""
        best, best_length = None, reusable(llm.input_ids[: llm.n_tokens], canonical, prompt)
        for snapshot in self._snapshots.values():
            length = reusable(snapshot.tokens, snapshot.canonical, prompt)
            if length > best_length:
                best, best_length = snapshot, length
        if best is not None and best_length >= self.min_tokens:
            llama_cpp.llama_state_set_data(llm._ctx.ctx, best.data, best.size)
            llm.input_ids[: len(best.tokens)] = best.tokens
            llm.n_tokens = len(best.tokens)
            canonical = best.canonical
            self._snapshots.move_to_end(best.tokens)
        return best_length, canonical

    def save(self, llm: llama_cpp.Llama, canonical: int) -> None:
        """Snapshots the context after a generation, keyed by the tokens it holds, if enough of it is reusable."""
        if self.capacity <= 0 or canonical < self.min_tokens:
            return
        tokens = tuple(int(t) for t in llm.input_ids[: llm.n_tokens])
        # One snapshot per shared prefix, the newest: an older one sharing a long prefix with this one would only
        # take a slot that another prefix needs.
        for key in [k for k in self._snapshots if common_prefix(k, tokens) >= self.min_tokens]:
            del self._snapshots[key]
        size = llama_cpp.llama_state_get_size(llm._ctx.ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(llm._ctx.ctx, buffer, size)
        self._snapshots[tokens] = Snapshot(tokens, canonical, buffer, written)
        while len(self._snapshots) > self.capacity:
            self._snapshots.popitem(last=False)

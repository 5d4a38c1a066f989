"""Batch-invariant prompt evaluation: a prompt's KV and logits are the same, bit for bit, whatever was reused.

llama.cpp chooses its matmul kernels by batch size (one token, a few, 32 or more: vec_dot, llamafile sgemm,
repacked or AMX tiles) and they round differently; on a CPU with AMX the difference reaches whole logits. When
a prompt was evaluated as "the part that differs from the previous prompt", its numbers depended on what the
replica served before it, and a greedy request could answer differently each time it was sent.

So every prompt is evaluated the same way: its tokens but the last in chunks of CHUNK aligned to position 0,
the last one alone (generate() evaluates it). Only whole chunks are ever reused, since a chunk cut short by the
end of one prompt is evaluated whole in a longer one. The same prompt then always meets the same kernels with
the same operands, whether it starts cold, from the live context, from a saved snapshot or on the replica that
resumes another's stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import llama_cpp

# Big enough that prompt evaluation keeps llama.cpp's batched kernels busy, small enough that a system prompt
# of a few chunks is reused almost whole (prefix_cache_min_tokens is 64).
CHUNK = 64


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    left, right = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.nonzero(left != right)[0]
    return int(differ[0]) if len(differ) else n


def whole_chunks(n: int) -> int:
    """The longest reusable length within n tokens: whole chunks from position 0."""
    return n - n % CHUNK


def reusable(context: Sequence[int], canonical: int, prompt: Sequence[int]) -> int:
    """How many leading tokens of `prompt` a context holding `context` can keep: shared with it, within its first
    `canonical` tokens (those evaluated in whole chunks), cut to whole chunks."""
    return whole_chunks(min(common_prefix(context, prompt[:-1]), canonical))


def prefill(llm: llama_cpp.Llama, prompt: Sequence[int], canonical: int) -> int:
    """Evaluates all of `prompt` but its last token into the context, keeping what it can of the live context
    (whose first `canonical` tokens were evaluated in whole chunks). Returns the new canonical length."""
    body = list(prompt[:-1])
    start = reusable(llm.input_ids[: llm.n_tokens], canonical, prompt)
    llm.n_tokens = start  # eval() drops every KV cell from here on
    for begin in range(start, len(body), CHUNK):
        llm.eval(body[begin:begin + CHUNK])
    return whole_chunks(len(body))

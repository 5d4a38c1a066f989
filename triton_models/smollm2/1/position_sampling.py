"""Sampling whose randomness depends only on (seed, position in the completion).

llama.cpp's sampler chain draws a varying number of random numbers per token (none when top-p/min-p leave one
candidate), so a seeded generation cannot be fast-forwarded on another replica. Seeding each token's draw from
(seed, position) instead makes a generation resumed from its first k tokens draw exactly the tokens the original
would have drawn after them: mid-stream failover keeps seeded requests identical, as greedy ones are.
"""

from __future__ import annotations

import hashlib

import llama_cpp


def position_seed(seed: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


class PositionSeededSampler:
    """Stands in for Llama.sample during one generation (generate() calls self.sample for each token)."""

    def __init__(self, llm: llama_cpp.Llama, seed: int, first_position: int, temperature: float, top_p: float,
                 top_k: int) -> None:
        self._llm = llm
        self._seed = seed
        self._position = first_position
        self._params = {"temp": temperature, "top_p": top_p, "top_k": top_k, "repeat_penalty": 1.0}

    def __call__(self, *, idx: int | None = None, **_ignored: object) -> int:
        llm = self._llm
        llm._seed = position_seed(self._seed, self._position)
        self._position += 1
        sampler = llm._init_sampler(**self._params)
        try:
            return sampler.sample(llm._ctx, -1 if idx is None else idx - llm.n_tokens)
        finally:
            sampler.close()

"""The reuse rule that keeps prompt evaluation batch-invariant (triton_models/smollm2/1/prefill.py)."""

from __future__ import annotations

import importlib.util

from tools.triton import MODEL_REPOSITORY

_spec = importlib.util.spec_from_file_location("prefill", MODEL_REPOSITORY / "smollm2" / "1" / "prefill.py")
prefill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prefill)
CHUNK = prefill.CHUNK


def test_only_whole_chunks_from_position_zero_are_reused():
    prompt = list(range(3 * CHUNK + 10))
    # Everything shared and canonical: the last token is always evaluated anew, so the tail chunk is not reused.
    assert prefill.reusable(prompt, 3 * CHUNK, prompt) == 3 * CHUNK
    # A context that diverges inside the second chunk keeps only the first.
    diverged = prompt[: CHUNK + 5] + [-1] * 100
    assert prefill.reusable(diverged, 3 * CHUNK, prompt) == CHUNK
    # Shared tokens beyond the canonical part (a partial chunk, generated tokens) are not reused.
    assert prefill.reusable(prompt, CHUNK, prompt) == CHUNK
    assert prefill.reusable(prompt, CHUNK - 1, prompt) == 0


def test_a_prompt_shorter_than_a_chunk_is_never_reused():
    prompt = list(range(CHUNK))
    assert prefill.reusable(prompt, CHUNK, prompt) == 0  # CHUNK - 1 tokens before the last: not a whole chunk
    longer = [*prompt, 1]
    assert prefill.reusable(longer, CHUNK, longer) == CHUNK


def test_common_prefix():
    assert prefill.common_prefix([], [1]) == 0
    assert prefill.common_prefix([1, 2, 3], [1, 2]) == 2
    assert prefill.common_prefix([1, 2, 3], [1, 5, 3]) == 1

"""Token-window chunking with overlap, in the embedder's own tokens, cut at the original text's offsets."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str


class Chunker:
    def __init__(self, tokenizer_file: str, size: int, overlap: int) -> None:
        if not 0 <= overlap < size:
            raise ValueError(f"chunk overlap {overlap} must be in [0, {size})")
        self._tokenizer = Tokenizer.from_file(tokenizer_file)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.size = size
        self.step = size - overlap

    def split(self, text: str) -> list[Chunk]:
        encoding = self._tokenizer.encode(text)
        offsets = [o for o, special in zip(encoding.offsets, encoding.special_tokens_mask, strict=True) if not special]
        if not offsets:
            return []
        chunks = []
        start = 0
        while True:
            window = offsets[start : start + self.size]
            chunks.append(Chunk(len(chunks), text[window[0][0] : window[-1][1]]))
            if start + self.size >= len(offsets):
                return chunks
            start += self.step

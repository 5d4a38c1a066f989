"""A generation model's tokenizer behind one small interface (the CPU model's and the TensorRT-LLM pools'): the
chat prompt as token ids (each message's content tokenized as plain text, so a message cannot open a turn of its
own), and text decoded incrementally from token ids, never emitting half a character.

Two sources: `hf:<dir>` (the Hugging Face checkpoint the engine was built from: tokenizer.json and its chat
template, with `transformers`, as in the TensorRT-LLM image) and `gguf:<file>` (the vocabulary and chat template
inside a GGUF file, with llama.cpp: the CPU stand-in's, so that the same ids mean the same text there).
"""

from __future__ import annotations

import codecs
import re
import secrets
from typing import Protocol


class TextStream(Protocol):
    def push(self, token: int) -> str: ...


class Tokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def chat_ids(self, messages: list[dict]) -> list[int]: ...

    def text_stream(self) -> TextStream: ...


def chat_ids(render, encode_text, encode_markup, messages: list[dict]) -> list[int]:
    """Each content replaced by a placeholder the caller cannot guess, the template rendered, the pieces
    tokenized apart: the template's markup with its control tokens, the contents as text."""
    nonce = secrets.token_hex(8)
    marks = {f"\ue000{nonce}:{i}\ue001": m["content"] for i, m in enumerate(messages)}
    rendered = render([{**m, "content": mark} for mark, m in zip(marks, messages, strict=True)])
    ids: list[int] = []
    for piece in re.split(f"(\ue000{nonce}:\\d+\ue001)", rendered):
        if piece in marks:
            ids += encode_text(marks[piece])
        elif piece:
            ids += encode_markup(piece)
    return ids


class _BytesStream:
    """Token bytes through an incremental UTF-8 decoder: a character split over tokens waits for its last byte."""

    def __init__(self, token_bytes) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))


class _WindowStream:
    """For tokenizers that only decode whole id lists: decode a short window before and after the new token and
    emit the difference once it no longer ends in a replacement character (vLLM's incremental detokenizer)."""

    def __init__(self, decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]


class GgufTokenizer:
    def __init__(self, path: str) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = Llama(model_path=path, vocab_only=True, verbose=False)
        text = self._llm._model.token_get_text
        self.eos_id = self._llm.token_eos()
        self.vocab_size = self._llm.n_vocab()
        self._formatter = Jinja2ChatFormatter(template=self._llm.metadata["tokenizer.chat_template"],
                                              eos_token=text(self.eos_id), bos_token=text(self._llm.token_bos()),
                                              stop_token_ids=[self.eos_id])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return chat_ids(lambda ms: self._formatter(messages=ms).prompt,
                         lambda t: self._llm.tokenize(t.encode("utf-8"), add_bos=False, special=False),
                         lambda t: self._llm.tokenize(t.encode("utf-8"), add_bos=False, special=True), messages)

    def text_stream(self) -> TextStream:
        return _BytesStream(lambda token: self._llm.detokenize([token], special=False))


class HfTokenizer:
    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if not getattr(self._tokenizer, "is_fast", False):
            raise ValueError(f"{directory} has no tokenizer.json: the pools need a fast (Rust) tokenizer")
        # Message contents as plain text: a copy of the Rust tokenizer that never matches special tokens in its
        # input. transformers' own `split_special_tokens` argument only exists from 4.42; the TensorRT-LLM 0.14
        # image's range (>=4.38.2,<=4.45.1) starts below that, so the copy works on every version it allows.
        self._text = Tokenizer.from_str(self._tokenizer.backend_tokenizer.to_str())
        self._text.encode_special_tokens = True
        self.eos_id = int(self._tokenizer.eos_token_id)
        self.vocab_size = len(self._tokenizer)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return chat_ids(
            lambda ms: self._tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=True),
            lambda t: self._text.encode(t, add_special_tokens=False).ids,
            lambda t: self._tokenizer.encode(t, add_special_tokens=False), messages)

    def text_stream(self) -> TextStream:
        return _WindowStream(lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True))


def load(source: str) -> Tokenizer:
    kind, _, path = source.partition(":")
    if kind == "gguf":
        from contract import packaged_gguf  # beside this file, shared with the CPU model

        return GgufTokenizer(path or packaged_gguf())
    if kind == "hf":
        return HfTokenizer(path)
    raise ValueError(f"tokenizer {source!r}: expected hf:<checkpoint dir> or gguf:<file>")

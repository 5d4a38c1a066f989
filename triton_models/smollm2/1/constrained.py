"""Decoding under a JSON schema: the schema compiled to a GBNF grammar by llama.cpp's converter (cached per
schema), and one sampler chain per generation with the grammar in it, so each token is drawn only from those
that keep the text a prefix of some valid answer. The end-of-generation token is allowed only where the answer is
complete.

The gateway has already refused every keyword this converter does not enforce (services/gateway/
structured_output.py); what is left to fail here is a pattern outside the converter's regex subset.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import llama_cpp
from calendar_date import CALENDAR_DATE
from contract import CALL_MARKER, INVALID
from llama_cpp._internals import LlamaSampler
from llama_cpp.llama_grammar import json_schema_to_gbnf


class GrammarCache:
    """GBNF text per schema text, least recently used out first. Compiling is Python work that grows with the
    schema (~1 ms for a small object, measured in BENCHMARKS.md); an agent sends the same schema on every call."""

    def __init__(self, size: int) -> None:
        self._size = max(size, 1)
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self.last_compile_s = 0.0

    def grammar(self, schema: str, tool_choice: str | None = None) -> str:
        """The grammar of an answer under `schema`; with a tool choice, `schema` is the calls' shape and the answer
        is the call marker and the calls ("required"), or that or plain text not opening with "<" ("auto")."""
        key = f"{tool_choice or ''}\n{schema}"
        found = self._grammars.get(key)
        if found is not None:
            self._grammars.move_to_end(key)
            self.last_compile_s = 0.0
            return found
        started = time.perf_counter()
        try:
            found = _calendar_dates(json_schema_to_gbnf(schema))
        except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
            raise ValueError(f"{INVALID}json_schema cannot be decoded under: {exc}") from exc
        if tool_choice in ("auto", "required"):
            found = _after_call_marker(found, plain_text=tool_choice == "auto")
        self.last_compile_s = time.perf_counter() - started
        self._grammars[key] = found
        while len(self._grammars) > self._size:
            self._grammars.popitem(last=False)
        return found


def _after_call_marker(grammar: str, plain_text: bool) -> str:
    lines = [("mesh-call-answer ::= " + line[len("root ::= "):]) if line.startswith("root ::= ") else line
             for line in grammar.split("\n")]
    root = f'root ::= "{CALL_MARKER}" mesh-call-answer' + (" | plain-text" if plain_text else "")
    extra = ['plain-text ::= [^<] [^\\x00]*'] if plain_text else []
    return "\n".join([root, *lines, *extra])


def _calendar_dates(grammar: str) -> str:
    return "\n".join(CALENDAR_DATE if line.startswith("date ::= ") else line for line in grammar.split("\n"))


class ConstrainedSampler:
    """Stands in for Llama.sample during one generation (generate() calls self.sample for each token). The chain
    is the one llama-cpp-python builds for these settings (grammar, then top-k/top-p/min-p/temperature and a seeded
    draw, or greedy), kept for the whole generation: the grammar's state is the answer so far. A stream resumed on
    this replica replays the tokens already sent into the grammar first.

    A seeded constrained stream resumed after a failover stays valid but is not the token-for-token continuation
    an uninterrupted run would have drawn (the position-seeded draw of unconstrained streams rebuilds its chain
    each token, which would lose the grammar's state); greedy ones are identical."""

    def __init__(self, llm: llama_cpp.Llama, grammar: str, temperature: float, top_p: float, seed: int,
                 resumed: list[int]) -> None:
        self._llm = llm
        handle = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
        if not handle:
            raise ValueError(f"{INVALID}json_schema compiled to a grammar llama.cpp does not accept")
        self._chain = LlamaSampler()
        llama_cpp.llama_sampler_chain_add(self._chain.sampler, handle)
        if temperature == 0:
            self._chain.add_greedy()
        else:
            self._chain.add_top_k(40)
            self._chain.add_top_p(top_p, 1)
            self._chain.add_min_p(0.05, 1)
            self._chain.add_temp(temperature)
            self._chain.add_dist(seed)
        for token in resumed:
            llama_cpp.llama_sampler_accept(self._chain.sampler, token)

    def __call__(self, *, idx: int | None = None, **_ignored: object) -> int:
        llm = self._llm
        return self._chain.sample(llm._ctx, -1 if idx is None else idx - llm.n_tokens)

    def close(self) -> None:
        self._chain.close()

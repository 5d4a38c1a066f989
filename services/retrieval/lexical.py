"""The terms BM25 sees (retrieval) and Ask's excerpts are chosen by: lower-cased words, English stop words out,
Snowball-stemmed.

Done here rather than by Milvus' analyzer because Milvus Lite's analyzer has no stemmer (it ignores the filter)
and a Milvus cluster's has one: the same chunks would be indexed under different terms in tests and in
production. Milvus then only splits this text into its words and weighs the terms (its BM25 function).
"""

from __future__ import annotations

import re
from functools import lru_cache

import snowballstemmer

# Milvus' analyzer only splits the space-separated words made here (Lite has "standard" and "jieba" only).
ANALYZER_PARAMS = {"tokenizer": "standard"}
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_GLUED = re.compile(r"(?<=[a-z])(?=[A-Z])")
# Lucene's English stop set plus question words: "how many failures trigger the breaker" is about failures,
# triggers and breakers; the question words only match other questions.
_STOP_WORDS_TEXT = """a an and are as at be but by for if in into is it no not of on or such that the their then
there these they this to was will with how what which who whom why when where do does did can could should would
i you we your our my me us many much"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
_stemmer = snowballstemmer.stemmer("english")


@lru_cache(maxsize=65_536)
def _stem(word: str) -> str:
    return _stemmer.stemWord(word)


def terms(text: str) -> list[str]:
    return [_stem(word) for word in _WORD.findall(text.lower()) if word not in STOP_WORDS]


def lexical_text(text: str) -> str:
    return " ".join(terms(text))


def unglue(text: str) -> str:
    """Words that text extraction glued together ("cachingTTL: 5 minutes", "enterpriseBurst Limit") apart, for
    search only (a chunk's text is returned as written): BM25 would index "cachingttl", MiniLM "caching ##tt".
    camelCase identifiers come apart the same way, which also lets their words match."""
    return _GLUED.sub(" ", text)

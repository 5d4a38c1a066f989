"""User filters on document metadata, checked token by token before they reach Milvus.

Only `metadata["key"]` operands, literals, comparisons, `in [..]`, `and`/`or`/`not` and balanced parentheses
are accepted, so a filter cannot name another field (such as tenant) or close the tenant clause it is
wrapped in.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<field>metadata\[\s*"(?:[A-Za-z0-9_.-]{1,64})"\s*\])
    | (?P<string>"(?:[^"\\]|\\.){0,256}")
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<op>==|!=|<=|>=|<|>)
    | (?P<word>and|or|not|in|AND|OR|NOT|IN|true|false)\b
    | (?P<punct>[()\[\],])
    )""", re.VERBOSE)


class FilterError(ValueError):
    pass


def to_milvus(user_filter: str, max_chars: int) -> str:
    """The filter, validated; raises FilterError with the position of the first bad token."""
    if len(user_filter) > max_chars:
        raise FilterError(f"filter is {len(user_filter)} characters; the limit is {max_chars}")
    position, depth, bracket, tokens = 0, 0, 0, 0
    text = user_filter.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise FilterError(f"filter: unexpected input at character {position}: {text[position:position + 20]!r}; "
                              'use metadata["key"] with ==, !=, <, >, in [...], and, or, not')
        punct = match.group("punct")
        if punct == "(":
            depth += 1
        elif punct == ")":
            depth -= 1
        elif punct == "[":
            bracket += 1
        elif punct == "]":
            bracket -= 1
        if depth < 0 or bracket < 0:
            raise FilterError(f"filter: unbalanced brackets at character {match.start()}")
        position = match.end()
        tokens += 1
    if depth or bracket:
        raise FilterError("filter: unbalanced brackets")
    if tokens and not re.search(r"metadata\[", text):
        raise FilterError('filter must test metadata, e.g. metadata["lang"] == "en"')
    return _expand_in(text.strip())


_IN = re.compile(r'(metadata\[\s*"[A-Za-z0-9_.-]{1,64}"\s*\])\s+(?:in|IN)\s+\[([^\[\]]*)\]')
_ITEM = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?')


def _expand_in(text: str) -> str:
    """`metadata["k"] in [a, b]` → `(metadata["k"] == a or metadata["k"] == b)`: not every Milvus (Milvus Lite
    among them) accepts `in` on a JSON key, every one accepts the comparisons."""
    def expand(match: re.Match) -> str:
        items = _ITEM.findall(match.group(2))
        if not items:
            raise FilterError(f"filter: empty list after {match.group(1)} in")
        return "(" + " or ".join(f"{match.group(1)} == {item}" for item in items) + ")"
    return _IN.sub(expand, text)

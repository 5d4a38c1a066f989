"""User filters on document metadata: parsed by a grammar into a tree, and only the tree is rendered for Milvus.

    filter      := or_expr
    or_expr     := and_expr ("or" and_expr)*
    and_expr    := not_expr ("and" not_expr)*
    not_expr    := "not" not_expr | primary
    primary     := "(" or_expr ")" | field op literal | field ["not"] "in" "[" literal ("," literal)* "]"
    field       := metadata["key"]            key: 1-64 of [A-Za-z0-9_.-]
    literal     := "string" | number | true | false

Nothing the caller wrote is passed on as text: keys are checked against their alphabet, strings are decoded and
quoted again, numbers re-printed, and every node is rendered fully parenthesised. So the rendered expression
means exactly the tree that was checked, and the caller cannot name another field (such as tenant) or close
the tenant clause it is wrapped in (services/retrieval/index.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

MAX_DEPTH = 16
MAX_NODES = 256
MAX_LIST_ITEMS = 64
# The one alphabet of metadata keys (the typed form checks keys against it too).
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<field>metadata\[\s*"(?P<key>""" + KEY_PATTERN.pattern + r""")"\s*\])
  | (?P<string>"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4}){0,256}")
  | (?P<number>-?(?:0|[1-9]\d{0,17})(?:\.\d{1,17})?)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<word>[A-Za-z_]+)
  | (?P<punct>[()\[\],])
""", re.VERBOSE)
_WORDS = {"and", "or", "not", "in", "true", "false"}
_HINT = 'use metadata["key"] with ==, !=, <, <=, >, >=, in [...], not in [...], and, or, not, parentheses'

Literal = str | int | float | bool


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Comparison:
    key: str
    op: str
    value: Literal


@dataclass(frozen=True)
class Membership:
    key: str
    values: tuple[Literal, ...]
    negated: bool = False


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    operands: tuple[Node, ...]


Node = Comparison | Membership | Not | BoolOp


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int
    key: str = ""


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise FilterError(f"filter: unexpected input at character {position}: "
                              f"{text[position:position + 20]!r}; {_HINT}")
        kind = match.lastgroup if match.lastgroup != "key" else "field"
        if kind == "word":
            word = match.group().lower()
            if word not in _WORDS:
                raise FilterError(f"filter: unknown word {match.group()!r} at character {position}; {_HINT}")
            tokens.append(_Token(word, word, position))
        elif kind == "field":
            tokens.append(_Token("field", match.group(), position, match.group("key")))
        elif kind != "space":
            tokens.append(_Token(kind, match.group(), position))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._next = 0
        self._nodes = 0

    def parse(self) -> Node:
        node = self._or(0)
        if self._next < len(self._tokens):
            token = self._tokens[self._next]
            raise FilterError(f"filter: unexpected {token.text!r} at character {token.position}; {_HINT}")
        return node

    def _peek(self) -> _Token | None:
        return self._tokens[self._next] if self._next < len(self._tokens) else None

    def _take(self, *kinds: str, what: str) -> _Token:
        token = self._peek()
        if token is None:
            raise FilterError(f"filter: ends where {what} was expected; {_HINT}")
        if token.kind not in kinds and token.text not in kinds:
            raise FilterError(f"filter: expected {what} at character {token.position}, found {token.text!r}; {_HINT}")
        self._next += 1
        return token

    def _count(self, depth: int) -> None:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise FilterError(f"filter: more than {MAX_NODES} terms")
        if depth > MAX_DEPTH:
            raise FilterError(f"filter: nested deeper than {MAX_DEPTH} levels")

    def _chain(self, op: str, depth: int, operand) -> Node:
        operands = [operand(depth)]
        while (token := self._peek()) is not None and token.kind == op:
            self._next += 1
            operands.append(operand(depth))
        if len(operands) == 1:
            return operands[0]
        self._count(depth)
        return BoolOp(op, tuple(operands))

    def _or(self, depth: int) -> Node:
        return self._chain("or", depth, self._and)

    def _and(self, depth: int) -> Node:
        return self._chain("and", depth, self._not)

    def _not(self, depth: int) -> Node:
        self._count(depth)
        token = self._peek()
        if token is not None and token.kind == "not":
            self._next += 1
            return Not(self._not(depth + 1))
        return self._primary(depth)

    def _primary(self, depth: int) -> Node:
        token = self._take("punct", "field", what='metadata["key"] or "("')
        if token.kind == "punct":
            if token.text != "(":
                raise FilterError(f"filter: unexpected {token.text!r} at character {token.position}; {_HINT}")
            node = self._or(depth + 1)
            self._take(")", what='")" (unbalanced parentheses)')
            return node
        following = self._peek()
        if following is not None and following.kind in ("in", "not"):
            return self._membership(token.key)
        op = self._take("op", what=f'a comparison after {token.text}')
        return Comparison(token.key, op.text, self._literal())

    def _membership(self, key: str) -> Membership:
        negated = self._peek().kind == "not"
        if negated:
            self._next += 1
        self._take("in", what='"in"')
        self._take("[", what='"["')
        values = [self._literal()]
        while self._take(",", "]", what='"," or "]"').text == ",":
            values.append(self._literal())
            if len(values) > MAX_LIST_ITEMS:
                raise FilterError(f"filter: a list holds at most {MAX_LIST_ITEMS} values")
        return Membership(key, tuple(values), negated)

    def _literal(self) -> Literal:
        token = self._take("string", "number", "true", "false", what="a string, number, true or false")
        if token.kind == "string":
            return json.loads(token.text)
        if token.kind == "number":
            value = float(token.text) if "." in token.text else int(token.text)
            if isinstance(value, float) and not math.isfinite(value):
                raise FilterError(f"filter: number out of range at character {token.position}")
            return value
        return token.kind == "true"


def parse(user_filter: str, max_chars: int) -> Node | None:
    """The filter's tree (None for an empty filter); raises FilterError naming the first problem."""
    if len(user_filter) > max_chars:
        raise FilterError(f"filter is {len(user_filter)} characters; the limit is {max_chars}")
    tokens = _tokenize(user_filter)
    return _Parser(tokens).parse() if tokens else None


def _literal(value: Literal) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _field(key: str) -> str:
    return f'metadata["{key}"]'


def render(node: Node) -> str:
    """Milvus expression text for a tree, every node in its own parentheses."""
    if isinstance(node, Comparison):
        return f"({_field(node.key)} {node.op} {_literal(node.value)})"
    if isinstance(node, Membership):
        # `in` expands to comparisons: not every Milvus (Milvus Lite among them) accepts `in` on a JSON key.
        op, joiner = ("!=", " and ") if node.negated else ("==", " or ")
        terms = [f"({_field(node.key)} {op} {_literal(v)})" for v in node.values]
        return terms[0] if len(terms) == 1 else "(" + joiner.join(terms) + ")"
    if isinstance(node, Not):
        return f"(not {render(node.operand)})"
    return "(" + f" {node.op} ".join(render(operand) for operand in node.operands) + ")"


def to_milvus(user_filter: str, max_chars: int) -> str:
    """The caller's filter rendered from its parsed tree ('' for none); raises FilterError."""
    tree = parse(user_filter, max_chars)
    return render(tree) if tree is not None else ""

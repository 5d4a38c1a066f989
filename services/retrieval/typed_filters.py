"""The typed form of a metadata filter (retrieval.proto MetadataFilter) turned into the grammar's tree.

Both forms end as the same tree (services/retrieval/filters.py) under the same rules, and only the tree is
rendered for Milvus: a typed filter cannot express more than the string grammar can.
"""

from __future__ import annotations

import math

from inference_mesh.v1 import retrieval_pb2
from services.retrieval.filters import (
    KEY_PATTERN,
    MAX_DEPTH,
    MAX_LIST_ITEMS,
    MAX_NODES,
    BoolOp,
    Comparison,
    FilterError,
    Literal,
    Membership,
    Node,
    Not,
)

MAX_TEXT_CHARS = 256
OPERATORS = {
    retrieval_pb2.FILTER_OP_EQ: "==", retrieval_pb2.FILTER_OP_NE: "!=", retrieval_pb2.FILTER_OP_LT: "<",
    retrieval_pb2.FILTER_OP_LE: "<=", retrieval_pb2.FILTER_OP_GT: ">", retrieval_pb2.FILTER_OP_GE: ">=",
}
_NODE_KINDS = "comparison, membership, negation, all_of or any_of"


def _key(key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise FilterError(f"where: key {key!r} must be 1 to 64 of [A-Za-z0-9_.-]")
    return key


def _value(value: retrieval_pb2.FilterValue) -> Literal:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise FilterError("where: a value needs one of text, integer, number or flag")
    if kind == "text" and len(value.text) > MAX_TEXT_CHARS:
        raise FilterError(f"where: a text value holds at most {MAX_TEXT_CHARS} characters")
    # Rendered as Milvus reads numbers: no exponent, nothing infinite.
    if kind == "number" and (not math.isfinite(value.number) or "e" in repr(value.number)):
        raise FilterError(f"where: number {value.number!r} is out of range (finite, without an exponent)")
    return getattr(value, kind)


class _Converter:
    def __init__(self) -> None:
        self._nodes = 0

    def node(self, message: retrieval_pb2.MetadataFilter, depth: int) -> Node:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise FilterError(f"where: more than {MAX_NODES} terms")
        if depth > MAX_DEPTH:
            raise FilterError(f"where: nested deeper than {MAX_DEPTH} levels")
        kind = message.WhichOneof("node")
        if kind == "comparison":
            comparison = message.comparison
            if comparison.op not in OPERATORS:
                raise FilterError("where: a comparison needs op (EQ, NE, LT, LE, GT or GE)")
            if not comparison.HasField("value"):
                raise FilterError("where: a comparison needs a value")
            return Comparison(_key(comparison.key), OPERATORS[comparison.op], _value(comparison.value))
        if kind == "membership":
            membership = message.membership
            if not 1 <= len(membership.values) <= MAX_LIST_ITEMS:
                raise FilterError(f"where: a membership lists 1 to {MAX_LIST_ITEMS} values")
            return Membership(_key(membership.key), tuple(_value(v) for v in membership.values), membership.negated)
        if kind == "negation":
            return Not(self.node(message.negation, depth + 1))
        if kind in ("all_of", "any_of"):
            operands = getattr(message, kind).operands
            if len(operands) < 2:
                raise FilterError(f"where: {kind} needs 2 or more operands")
            return BoolOp("and" if kind == "all_of" else "or", tuple(self.node(o, depth + 1) for o in operands))
        raise FilterError(f"where: an empty node; set one of {_NODE_KINDS}")


def from_message(where: retrieval_pb2.MetadataFilter) -> Node:
    """The tree of a typed filter; raises FilterError naming the first problem."""
    return _Converter().node(where, 0)

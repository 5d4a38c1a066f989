"""The typed filter (retrieval.proto MetadataFilter) becomes the same tree as the string grammar, under its rules."""

from __future__ import annotations

import pytest
from hypothesis import given

from inference_mesh.v1 import retrieval_pb2 as r
from services.retrieval.filters import Comparison, FilterError, Membership, Not, parse, render
from services.retrieval.typed_filters import OPERATORS, from_message
from tests.unit.retrieval.test_filters import _trees

SYMBOLS = {symbol: op for op, symbol in OPERATORS.items()}


def _value(value) -> r.FilterValue:
    if isinstance(value, bool):
        return r.FilterValue(flag=value)
    if isinstance(value, int):
        return r.FilterValue(integer=value)
    if isinstance(value, float):
        return r.FilterValue(number=value)
    return r.FilterValue(text=value)


def to_message(node) -> r.MetadataFilter:
    if isinstance(node, Comparison):
        return r.MetadataFilter(comparison=r.FilterComparison(key=node.key, op=SYMBOLS[node.op],
                                                              value=_value(node.value)))
    if isinstance(node, Membership):
        return r.MetadataFilter(membership=r.FilterMembership(key=node.key, values=[_value(v) for v in node.values],
                                                              negated=node.negated))
    if isinstance(node, Not):
        return r.MetadataFilter(negation=to_message(node.operand))
    group = r.FilterGroup(operands=[to_message(o) for o in node.operands])
    return r.MetadataFilter(all_of=group) if node.op == "and" else r.MetadataFilter(any_of=group)


@given(_trees)
def test_a_typed_filter_is_the_tree_it_describes(tree):
    assert from_message(to_message(tree)) == tree
    assert render(from_message(to_message(tree))) == render(tree)


def test_the_typed_and_the_string_form_render_alike():
    text = 'metadata["lang"] == "en" and not (metadata["year"] < 2020 or metadata["tag"] in ["a", "b"])'
    assert render(from_message(to_message(parse(text, 1000)))) == render(parse(text, 1000))


def _comparison(key="lang", op=r.FILTER_OP_EQ, value=None) -> r.MetadataFilter:
    return r.MetadataFilter(comparison=r.FilterComparison(key=key, op=op, value=value or r.FilterValue(text="en")))


def _nested(depth: int) -> r.MetadataFilter:
    node = _comparison()
    for _ in range(depth):
        node = r.MetadataFilter(negation=node)
    return node


@pytest.mark.parametrize(("message", "problem"), [
    (r.MetadataFilter(), "empty node"),
    (_comparison(key='lang"] or tenant != "x'), "key"),
    (_comparison(key="tenant\x00"), "key"),
    (_comparison(op=r.FILTER_OP_UNSPECIFIED), "op"),
    (r.MetadataFilter(comparison=r.FilterComparison(key="lang", op=r.FILTER_OP_EQ)), "needs a value"),
    (_comparison(value=r.FilterValue()), "one of text"),
    (_comparison(value=r.FilterValue(number=1e300)), "out of range"),
    (_comparison(value=r.FilterValue(number=float("nan"))), "out of range"),
    (_comparison(value=r.FilterValue(text="x" * 257)), "at most 256"),
    (r.MetadataFilter(membership=r.FilterMembership(key="tag")), "1 to 64"),
    (r.MetadataFilter(membership=r.FilterMembership(key="tag", values=[r.FilterValue(integer=i) for i in range(65)])),
     "1 to 64"),
    (r.MetadataFilter(all_of=r.FilterGroup(operands=[_comparison()])), "2 or more"),
    (_nested(17), "deeper than 16"),
    (r.MetadataFilter(any_of=r.FilterGroup(operands=[_comparison()] * 300)), "more than 256"),
])
def test_refuses_what_the_grammar_refuses(message, problem):
    with pytest.raises(FilterError, match=problem):
        from_message(message)

"""The metadata filter grammar: what it accepts, what it refuses, and that rendering keeps the checked meaning."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.retrieval.filters import (
    BoolOp,
    Comparison,
    FilterError,
    Membership,
    Not,
    parse,
    render,
    to_milvus,
)


def test_accepts_metadata_expressions_and_expands_in():
    assert to_milvus('metadata["lang"] == "en"', 100) == '(metadata["lang"] == "en")'
    assert to_milvus('metadata["k"] in ["a", "b"] and not (metadata["n"] >= 3)', 200) == \
        '(((metadata["k"] == "a") or (metadata["k"] == "b")) and (not (metadata["n"] >= 3)))'
    assert to_milvus('metadata["k"] NOT IN ["a"]', 100) == '(metadata["k"] != "a")'
    assert to_milvus("", 10) == to_milvus("   ", 10) == ""
    # Strings are decoded and quoted again: an escaped quote stays inside its literal.
    assert to_milvus(r'metadata["k"] == "a\") or (tenant != \"x"', 100) == \
        r'(metadata["k"] == "a\") or (tenant != \"x")'


@pytest.mark.parametrize("bad", [
    # The cross-tenant read found in the field: parentheses inside an `in` list balanced brackets and
    # parentheses separately, and the `in` expansion dropped them, so `) or (` reached Milvus.
    'metadata["k"] in ["a", (] ) or ( metadata["k"] in [ "a" ) ]',
    'metadata["a"] == "b") or (tenant != "x"',  # closes the tenant clause
    'tenant == "other"',                         # names another field
    "pk != ''",                                  # single quotes and another field
    'metadata["a"] == "b"; drop',
    '((metadata["a"] == "b")',
    'metadata["a"] == "b" or 1 == 1',            # a literal on the left
    'metadata["a"] in []',
    'metadata["a"] in ["b" "c"]',
    'metadata["a"] == metadata["b"]',
    'metadata["a b"] == "c"',
    'metadata["a"] == "b" and',
    'not',
    'metadata["a"] like "b%"',
    'metadata["a"] == "\u0000"',
    "(" * 40 + 'metadata["a"] == "b"' + ")" * 40,  # deeper than the limit
])
def test_refuses_what_is_not_the_grammar(bad):
    with pytest.raises(FilterError):
        to_milvus(bad, 2_000)


def test_refuses_long_filters_and_lists():
    with pytest.raises(FilterError, match="the limit is 20"):
        to_milvus('metadata["lang"] == "english"', 20)
    with pytest.raises(FilterError, match="at most 64"):
        to_milvus('metadata["a"] in [' + ", ".join(['"x"'] * 65) + "]", 10_000)


_keys = st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True)
_literals = st.one_of(st.text(max_size=12).filter(lambda s: "\x00" not in s), st.integers(-10**6, 10**6),
                      st.booleans())
_leaves = st.one_of(
    st.builds(Comparison, _keys, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), _literals),
    st.builds(Membership, _keys, st.lists(_literals, min_size=1, max_size=4).map(tuple), st.booleans()))
_trees = st.recursive(_leaves, lambda inner: st.one_of(
    st.builds(Not, inner),
    st.builds(BoolOp, st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3).map(tuple))),
    max_leaves=12)


def _keys_of(node) -> set[str]:
    if isinstance(node, Comparison | Membership):
        return {node.key}
    if isinstance(node, Not):
        return _keys_of(node.operand)
    return set().union(*(_keys_of(o) for o in node.operands))


@settings(max_examples=300, deadline=None)
@given(_trees)
def test_rendering_is_a_fixed_point_and_names_only_metadata(tree):
    text = render(tree)
    reparsed = parse(text, 100_000)
    # Rendered text parses back to a tree that renders identically: what Milvus gets is what was checked.
    assert render(reparsed) == text
    assert _keys_of(reparsed) <= _keys_of(tree)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='metadata[]"()tenant=!<>, andornotin01\\', max_size=80))
def test_any_accepted_text_renders_to_something_that_reparses(text):
    try:
        tree = parse(text, 1_000)
    except FilterError:
        return
    if tree is not None:
        assert render(parse(render(tree), 100_000)) == render(tree)

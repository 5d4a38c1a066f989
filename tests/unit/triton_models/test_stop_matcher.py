"""The LLM model's stop matcher (triton_models/smollm2/1/stop_matcher.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _load_stop_matcher():
    spec = importlib.util.spec_from_file_location("stop_matcher", ROOT / "triton_models/smollm2/1/stop_matcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StopMatcher


StopMatcher = _load_stop_matcher()


def feed_all(matcher, pieces: list[str]) -> str:
    out = ""
    for piece in pieces:
        out += matcher.feed(piece)
        if matcher.stopped:
            return out
    return out + matcher.flush()


@pytest.mark.parametrize(("pieces", "stops", "expected", "stopped"), [
    (["Hello", " wor", "ld"], [], "Hello world", False),
    (["one,", " two"], [","], "one", True),
    (["abc", "EN", "D tail"], ["END"], "abc", True),
    (["abc", "EN", "x"], ["END"], "abcENx", False),          # a partial match is released once it cannot match
    (["a", "b"], ["bc"], "ab", False),                        # held-back text is flushed at the end
    (["x<|", "stop|>y"], ["<|stop|>"], "x", True),
])
def test_stop_matcher(pieces, stops, expected, stopped):
    matcher = StopMatcher(stops)
    assert feed_all(matcher, pieces) == expected
    assert matcher.stopped is stopped


def test_stop_matcher_never_releases_a_prefix_of_a_stop():
    matcher = StopMatcher(["###"])
    assert matcher.feed("text #") == "text "
    assert matcher.feed("#") == ""
    assert matcher.feed("#") == "" and matcher.stopped

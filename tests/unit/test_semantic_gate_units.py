"""The semantic cache's content gate, its labelled set and the calibration arithmetic, without servers."""

from __future__ import annotations

import pytest

from services.cache.verify import conflict
from tools.calibrate_semantic import Scored, calibrate, gate_miss_rate, rates, wilson
from tools.semantic_pairs import PAIRS_FILE, SPLITS, generate, load


@pytest.mark.parametrize(("question", "candidate"), [
    ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?"),
    ("How do I sort a dict by value in Python?", "How do I sort a dict by key in Python?"),
    ("How do I enable Bluetooth?", "How do I disable Bluetooth?"),
    ("What are the pros of remote work?", "What are the cons of remote work?"),
    ("When did the war end?", "When did the war start?"),
    ("Reasons to learn Rust?", "Reasons not to learn Rust?"),
    ("How do I parse JSON in Python?", "How do I parse JSON in JavaScript?"),
    ("What is 15% of 120?", "What is 15% of 140?"),
    ("Calories in two bananas?", "Calories in three bananas?"),
    ("What's the weather in Oslo today?", "What's the weather in Oslo tomorrow?"),
    ("What is the capital of Spain?", "Tell me the capital of Norway."),
])
def test_near_misses_are_refused(question, candidate):
    assert conflict(question, candidate)
    assert conflict(candidate, question), "the gate is symmetric"


@pytest.mark.parametrize(("question", "candidate"), [
    ("How do I convert Celsius to Fahrenheit?", "What's the formula to go from Celsius to Fahrenheit?"),
    ("What is 15% of 120?", "Calculate 15 percent of 120."),
    ("Kotlin: sort dictionary by key", "How do I sort a dictionary by key in Kotlin?"),
    ("What's Japan's oldest lake?", "Which lake in Japan is the oldest?"),
    ("How do I merge two dictionaries in Python?", "In Python, how can I combine two dicts into one?"),
    ("How do I write a cover letter?", "What should I put in a cover letter and how do I write one?"),
    ("Why is the sky blue?", "What makes the sky look blue?"),
])
def test_paraphrases_pass(question, candidate):
    assert conflict(question, candidate) is None


def test_the_labelled_set_is_what_the_generator_gives_and_big_enough():
    rows = load()
    assert rows == generate(), "regenerate: python -m tools.semantic_pairs"
    assert sum(r["label"] == "paraphrase" for r in rows) >= 300
    assert sum(r["label"] == "near_miss" for r in rows) >= 300
    assert len({(r["a"], r["b"]) for r in rows}) == len(rows)
    texts = {split: {t for r in rows if r["split"] == split for t in (r["a"], r["b"])} for split in SPLITS}
    assert not texts["heldout"] & (texts["tuning"] | texts["validation"]), "a held-out question is in calibration"
    categories = {r["category"] for r in rows if r["label"] == "near_miss"}
    assert {"direction", "antonym", "negation", "quantity", "entity", "time", "scope"} <= categories
    assert PAIRS_FILE.exists()


def test_wilson_interval():
    low, high = wilson(0, 200)
    assert low == 0.0 and 0.018 < high < 0.02
    low, high = wilson(50, 100)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60


def test_calibration_counts_on_the_gate_only_as_far_as_validation_shows_it_works():
    tuning = [Scored("near_miss", "tuning", s, True) for s in (0.99, 0.95, 0.90, 0.85)] + \
             [Scored("paraphrase", "tuning", s, False) for s in (0.97, 0.93, 0.88)]
    perfect = [Scored("near_miss", "validation", s, True) for s in (0.96, 0.91, 0.86)]
    half = [Scored("near_miss", "validation", 0.96, False), Scored("near_miss", "validation", 0.92, True)]
    # A gate that never missed on validation: any threshold the tuning split's gated rate allows.
    assert calibrate(tuning, perfect, 0.01) == pytest.approx(0.70)
    # One that let the 0.96 near miss through: the expected rate (tuning near misses at or above t, times the
    # validation share missed there) is within 20% only above 0.96.
    assert calibrate(tuning, half, 0.20) == pytest.approx(0.965)
    assert gate_miss_rate(half, 0.90) == 0.5 and gate_miss_rate(half, 0.97) == 0.0
    at = rates(tuning, 0.955, gate=False)
    assert (at["paraphrase_hits"], at["false_hits"]) == (1, 1)
    assert rates(tuning, 0.955, gate=True)["false_hits"] == 0


def test_a_budget_without_calibration_is_refused_where_it_is_set():
    import yaml

    from services.common.semantic_calibration import SemanticCalibration, UncalibratedBudget
    from services.router.registry import Registry

    calibration = SemanticCalibration.load()
    assert calibration.threshold(0.01) == pytest.approx(calibration.thresholds[0.01])
    with pytest.raises(UncalibratedBudget, match="calibrate_semantic"):
        calibration.threshold(0.03)
    with pytest.raises(UncalibratedBudget, match="embedder"):
        calibration.check(0.01, "another-embedder")
    registry = yaml.safe_load((PAIRS_FILE.parents[2] / "config" / "registry.yaml").read_text())
    llm = next(name for name, spec in registry["models"].items() if spec["kind"] == "generate")
    registry["models"][llm]["semantic_max_false_hit_rate"] = 0.02
    assert Registry.model_validate(registry).models[llm].semantic_max_false_hit_rate == 0.02
    registry["models"][llm]["semantic_max_false_hit_rate"] = 0.03
    with pytest.raises(ValueError, match=r"no calibration for a semantic false-hit budget of 0\.03"):
        Registry.model_validate(registry)

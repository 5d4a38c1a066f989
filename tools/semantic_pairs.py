"""The semantic cache's labelled set: pairs of questions that must share an answer (paraphrases) and pairs that
must not (near misses: almost the same words, a different answer). `python -m tools.semantic_pairs` writes
data/semantic-cache/pairs.jsonl; the same seed gives the same file.

Method (docs/semantic-cache.md): each family is one kind of question with several hand-written surface forms
that all ask the same thing, and slots filled from small lexicons. A paraphrase pair is two different forms with
the same slot values; a near-miss pair changes what the question asks (the family's contrast: another entity,
the opposite verb, the other direction, a negation, another number, another time, another scope), in the same
form or in two different forms. Families are dealt whole into three splits: tuning (the similarity curve the
threshold is read from), validation (how often the content gate misses a near miss of a kind it was not written
for: families it has not seen) and held-out (reported, never used to choose anything), so a held-out pair never
reuses a calibration pair's wording.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS_FILE = ROOT / "data" / "semantic-cache" / "pairs.jsonl"
SEED = 20261202
PER_FAMILY = 24  # paraphrase pairs per family, and as many near misses

UNITS = [("Celsius", "Fahrenheit"), ("miles", "kilometers"), ("pounds", "kilograms"), ("inches", "centimeters"),
         ("liters", "gallons"), ("feet", "meters"), ("ounces", "grams"), ("US dollars", "euros"),
         ("hours", "seconds"), ("megabytes", "gigabytes"), ("acres", "hectares"), ("knots", "miles per hour")]
LANGUAGES = ["Python", "JavaScript", "Java", "Go", "Rust", "C++", "Ruby", "TypeScript", "Kotlin", "Swift", "PHP",
             "C#", "Scala", "Haskell", "Perl", "Elixir"]
SYSTEMS = ["Windows", "macOS", "Linux", "Android", "iOS", "Ubuntu", "ChromeOS", "Fedora"]
COUNTRIES = ["France", "Spain", "Germany", "Italy", "Japan", "Canada", "Brazil", "India", "Egypt", "Kenya",
             "Norway", "Peru", "Chile", "Mexico", "Poland", "Greece", "Vietnam", "Portugal", "Ireland", "Morocco",
             "Argentina", "Sweden", "Thailand", "Turkey"]
CITIES = ["Paris", "Madrid", "Berlin", "Rome", "Tokyo", "Toronto", "Lisbon", "Dublin", "Oslo", "Lima", "Cairo",
          "Nairobi", "Athens", "Warsaw", "Hanoi", "Bangkok", "Istanbul", "Stockholm", "Vienna", "Prague"]
TASKS = ["reverse a string", "read a file line by line", "parse JSON", "sort a list", "remove duplicates from a list",
         "get the current date", "make an HTTP request", "split a string by commas", "check if a file exists",
         "generate a random number", "convert a string to an integer", "find the length of an array",
         "write to a CSV file", "round a number to two decimals", "measure elapsed time", "create a thread"]
ACTIONS = [("enable", "disable", "two-factor authentication"), ("turn on", "turn off", "dark mode"),
           ("install", "uninstall", "Docker"), ("encrypt", "decrypt", "a ZIP file"),
           ("compress", "decompress", "a folder"), ("lock", "unlock", "cells in a spreadsheet"),
           ("show", "hide", "hidden files"), ("upload", "download", "photos to iCloud"),
           ("import", "export", "contacts"), ("increase", "decrease", "the font size"),
           ("start", "stop", "the SSH service"), ("add", "remove", "a user from a group"),
           ("mute", "unmute", "notifications"), ("merge", "split", "PDF files"), ("zoom in", "zoom out", "a map"),
           ("pin", "unpin", "a message"), ("archive", "unarchive", "an email"), ("block", "unblock", "a number")]
CONTRASTS = [("pros", "cons"), ("advantages", "disadvantages"), ("benefits", "risks"), ("strengths", "weaknesses")]
TOPICS = ["remote work", "nuclear power", "electric cars", "microservices", "homeschooling", "solar panels",
          "social media", "a four-day work week", "renting a home", "freelancing", "open-plan offices",
          "cryptocurrency", "vegetarian diets", "public transport", "online degrees", "static typing"]
DEEDS = ["learn Rust", "move to Berlin", "buy an electric car", "use microservices", "rent an apartment",
         "drink coffee every day", "use Kubernetes", "study abroad", "adopt a cat", "quit social media",
         "start a podcast", "learn Latin", "work from home", "buy a house now", "use a password manager",
         "run a marathon", "switch to Linux", "get a master's degree"]
HABITS = ["skip breakfast", "pay my taxes late", "water my plants every day", "update my phone", "back up my laptop",
          "stretch before running", "charge my phone overnight", "wash new clothes", "renew my passport early",
          "change my car's oil", "drink eight glasses of water", "unplug my router at night"]
EVENTS = ["World War I", "World War II", "the Cold War", "the French Revolution", "the Great Depression",
          "the Hundred Years' War", "the Vietnam War", "the Korean War", "the Space Race", "the Thirty Years' War",
          "the American Civil War", "the Napoleonic Wars", "the Gold Rush", "the Renaissance"]
SUPERLATIVES = [("largest", "smallest"), ("highest", "lowest"), ("longest", "shortest"), ("oldest", "newest"),
                ("hottest", "coldest"), ("deepest", "shallowest")]
THINGS = ["lake", "mountain", "river", "city", "island", "national park", "desert", "bridge"]
YEARS = list(range(1950, 2021, 5))
DISHES = ["pancakes", "lasagna", "banana bread", "pad thai", "risotto", "chili", "apple pie", "hummus",
          "guacamole", "fried rice", "tomato soup", "brownies"]
FOODS = ["grapes", "chocolate", "carrots", "cheese", "apples", "onions", "rice", "eggs", "bananas", "peanut butter",
         "blueberries", "avocado"]
ANIMALS = ["dogs", "cats", "rabbits", "parrots", "hamsters", "horses"]
LANGUAGE_PAIRS = [("English", "French"), ("Spanish", "German"), ("Italian", "English"), ("Japanese", "Korean"),
                  ("Portuguese", "Dutch"), ("Russian", "Polish"), ("Arabic", "Turkish"), ("Greek", "Swedish")]
PHRASES = ["good morning", "thank you very much", "where is the station", "I am hungry", "see you tomorrow",
           "how much does it cost", "happy birthday", "I love you"]


@dataclass(frozen=True)
class Family:
    """One kind of question: its surface forms (every one asks the same thing), how slots are drawn, and how a
    near miss changes what is asked."""

    name: str
    category: str
    forms: tuple[str, ...]
    draw: Callable[[random.Random], dict]
    contrast: Callable[[random.Random, dict], dict]


def _other(rng: random.Random, values: list, current) -> object:
    return rng.choice([v for v in values if v != current])


def _swap(slots: dict, a: str, b: str) -> dict:
    return {**slots, a: slots[b], b: slots[a]}


def _antonym(rng: random.Random, slots: dict) -> dict:
    return {**slots, "do": slots["undo"], "undo": slots["do"]}


FAMILIES = [
    Family("unit-conversion", "direction", (
        "How do I convert {a} to {b}?", "What's the formula to go from {a} to {b}?", "{a} to {b} conversion",
        "How can I turn {a} into {b}?", "Convert {a} into {b}, how?", "What is the way to change {a} to {b}?"),
        lambda r: dict(zip("ab", r.choice(UNITS), strict=True)) if r.random() < 0.5
        else dict(zip("ba", r.choice(UNITS), strict=True)),
        lambda r, s: _swap(s, "a", "b")),
    Family("translation-direction", "direction", (
        "How do you say '{phrase}' when translating from {a} to {b}?", "Translate '{phrase}' from {a} into {b}.",
        "'{phrase}': {a} to {b} translation, please.", "What is '{phrase}' in {b} if the original is {a}?"),
        lambda r: {**dict(zip("ab", r.choice(LANGUAGE_PAIRS), strict=True)), "phrase": r.choice(PHRASES)},
        lambda r, s: _swap(s, "a", "b")),
    Family("flight-route", "direction", (
        "Cheapest flights from {a} to {b}?", "How do I find a cheap flight from {a} to {b}?",
        "Budget airfare {a} to {b}", "What's the least expensive way to fly from {a} to {b}?"),
        lambda r: dict(zip("ab", r.sample(CITIES, 2), strict=True)),
        lambda r, s: _swap(s, "a", "b")),
    Family("settings-toggle", "antonym", (
        "How do I {do} {thing} on {os}?", "What are the steps to {do} {thing} on {os}?",
        "{os}: how to {do} {thing}", "On {os}, how can I {do} {thing}?", "Guide to {do} {thing} in {os}"),
        lambda r: {**dict(zip(("do", "undo", "thing"), r.choice(ACTIONS), strict=True)), "os": r.choice(SYSTEMS)},
        _antonym),
    Family("pros-cons", "antonym", (
        "What are the {good} of {topic}?", "List the {good} of {topic}.", "{topic}: what are its {good}?",
        "Tell me the main {good} of {topic}.", "Which {good} does {topic} have?"),
        lambda r: {**dict(zip(("good", "bad"), r.choice(CONTRASTS), strict=True)), "topic": r.choice(TOPICS)},
        lambda r, s: _swap(s, "good", "bad")),
    Family("superlative", "antonym", (
        "What is the {most} {thing} in {country}?", "Which {thing} in {country} is the {most}?",
        "{country}'s {most} {thing}?", "Name the {most} {thing} in {country}."),
        lambda r: {**dict(zip(("most", "least"), r.choice(SUPERLATIVES), strict=True)), "thing": r.choice(THINGS),
                   "country": r.choice(COUNTRIES)},
        lambda r, s: _swap(s, "most", "least")),
    Family("war-start-end", "time", (
        "When did {event} {edge}?", "In what year did {event} {edge}?", "What year did {event} {edge}?",
        "{event}: when did it {edge}?"),
        lambda r: {"event": r.choice(EVENTS), **dict(zip(("edge", "other"), r.sample(["start", "end"], 2),
                                                           strict=True))},
        lambda r, s: _swap(s, "edge", "other")),
    Family("reasons-negation", "negation", (
        "What are good reasons to {deed}?", "Why should I {deed}?", "Give me reasons to {deed}.",
        "What are the arguments for choosing to {deed}?"),
        lambda r: {"deed": r.choice(DEEDS)},
        lambda r, s: {**s, "deed": "not " + s["deed"]}),
    Family("what-if-negation", "negation", (
        "What happens if I {deed}?", "What are the consequences if I {deed}?", "If I {deed}, what happens?",
        "What will happen when I {deed}?"),
        lambda r: {"deed": r.choice(HABITS)},
        lambda r, s: {**s, "deed": "don't " + s["deed"]}),
    Family("safe-food", "entity", (
        "Can {animal} eat {food}?", "Is {food} safe for {animal}?", "Is it OK to give {food} to {animal}?",
        "Are {animal} allowed to eat {food}?"),
        lambda r: {"animal": r.choice(ANIMALS), "food": r.choice(FOODS)},
        lambda r, s: {**s, "food": _other(r, FOODS, s["food"])}),
    Family("percent-of", "quantity", (
        "What is {p}% of {n}?", "Calculate {p} percent of {n}.", "{p}% of {n} = ?", "How much is {p} percent of {n}?"),
        lambda r: {"p": r.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), "n": r.choice([80, 120, 250, 360, 500, 640])},
        lambda r, s: {**s, r.choice("pn"): s["n"] + r.choice([10, 20, 40]) if r.random() < 0.5 else s["p"] + 5}),
    Family("recipe-servings", "quantity", (
        "How do I make {dish} for {n} people?", "Recipe for {dish} that serves {n}?",
        "{dish} recipe, {n} servings", "What's a good {dish} recipe for {n} people?"),
        lambda r: {"dish": r.choice(DISHES), "n": r.choice([2, 4, 6, 8, 12])},
        lambda r, s: {**s, "n": _other(r, [2, 4, 6, 8, 12, 20], s["n"])}),
    Family("weeks-days", "quantity", (
        "How many days are in {n} weeks?", "{n} weeks is how many days?", "Number of days in {n} weeks?",
        "Convert {n} weeks to days."),
        lambda r: {"n": r.randint(2, 60)},
        lambda r, s: {**s, "n": s["n"] + r.randint(1, 9)}),
    Family("capital", "entity", (
        "What is the capital of {country}?", "Which city is the capital of {country}?",
        "What's {country}'s capital city?", "Tell me the capital of {country}.", "capital of {country}?",
        "Name the capital city of {country}."),
        lambda r: {"country": r.choice(COUNTRIES)},
        lambda r, s: {**s, "country": _other(r, COUNTRIES, s["country"])}),
    Family("currency", "entity", (
        "What currency is used in {country}?", "Which money do they use in {country}?",
        "What's the currency of {country}?", "{country} currency?"),
        lambda r: {"country": r.choice(COUNTRIES)},
        lambda r, s: {**s, "country": _other(r, COUNTRIES, s["country"])}),
    Family("population-year", "time", (
        "What was the population of {city} in {year}?", "How many people lived in {city} in {year}?",
        "{city} population in {year}?", "Population of {city}, year {year}?"),
        lambda r: {"city": r.choice(CITIES), "year": r.choice(YEARS)},
        lambda r, s: {**s, "year": _other(r, YEARS, s["year"])}),
    Family("weather-day", "time", (
        "What's the weather in {city} {day}?", "How is the weather {day} in {city}?",
        "{city} weather forecast for {day}?", "Weather for {city}, {day}?"),
        lambda r: {"city": r.choice(CITIES), "day": r.choice(["today", "tomorrow", "this weekend"])},
        lambda r, s: {**s, "day": _other(r, ["today", "tomorrow", "this weekend", "yesterday"], s["day"])}),
    Family("code-task-language", "scope", (
        "How do I {task} in {lang}?", "What's the best way to {task} in {lang}?", "In {lang}, how can I {task}?",
        "{lang}: {task}?", "Show me how to {task} using {lang}.", "Code to {task} in {lang}"),
        lambda r: {"task": r.choice(TASKS), "lang": r.choice(LANGUAGES)},
        lambda r, s: {**s, "lang": _other(r, LANGUAGES, s["lang"])}),
    Family("code-task-swap", "entity", (
        "How would I {task} in {lang}?", "What's the simplest way to {task} in {lang}?",
        "In {lang}, how do you {task}?", "{lang} example: {task}"),
        lambda r: {"task": r.choice(TASKS), "lang": r.choice(LANGUAGES)},
        lambda r, s: {**s, "task": _other(r, TASKS, s["task"])}),
    Family("sort-dict", "entity", (
        "How do I sort a dictionary by {part} in {lang}?", "Sort a map by its {part}s in {lang}?",
        "In {lang}, what's the way to order a dict by {part}?", "{lang}: sort dictionary by {part}"),
        lambda r: {"part": r.choice(["value", "key"]), "lang": r.choice(["Python", "JavaScript", "Go", "Ruby",
                                                                         "Java", "Kotlin", "Swift", "C#"])},
        lambda r, s: {**s, "part": "key" if s["part"] == "value" else "value"}),
    Family("shortcut-system", "scope", (
        "What is the keyboard shortcut to {do} {thing} on {os}?", "Shortcut key to {do} {thing} on {os}?",
        "On {os}, which keys {do} {thing}?", "{os} hotkey to {do} {thing}"),
        lambda r: {**dict(zip(("do", "undo", "thing"), r.choice(ACTIONS), strict=True)), "os": r.choice(SYSTEMS)},
        lambda r, s: {**s, "os": _other(r, SYSTEMS, s["os"])}),
]


def _fill(form: str, slots: dict) -> str:
    text = form.format(**slots)
    return text[0].upper() + text[1:]


SPLITS = ("tuning", "validation", "heldout")


def _split(family_index: int) -> str:
    """Families are dealt whole into three splits: a held-out pair shares no wording with a calibration pair."""
    return SPLITS[family_index % len(SPLITS)]


def generate(seed: int = SEED, per_family: int = PER_FAMILY) -> list[dict]:
    rng = random.Random(seed)
    pairs: list[dict] = []
    for index, family in enumerate(FAMILIES):
        seen: set[tuple[str, str]] = set()
        made = {"paraphrase": 0, "near_miss": 0}
        attempts = 0
        while min(made.values()) < per_family and attempts < per_family * 50:
            attempts += 1
            slots = family.draw(rng)
            first, second = rng.sample(family.forms, 2)
            label = "paraphrase" if made["paraphrase"] <= made["near_miss"] else "near_miss"
            if label == "paraphrase":
                a, b = _fill(first, slots), _fill(second, slots)
            else:
                changed = family.contrast(rng, slots)
                # Half the near misses keep the wording and change only what is asked: the hardest case.
                a, b = _fill(first, slots), _fill(first if rng.random() < 0.5 else second, changed)
            if a == b or (a, b) in seen:
                continue
            seen.add((a, b))
            made[label] += 1
            pairs.append({"id": f"{family.name}-{label}-{made[label]}", "family": family.name,
                          "category": family.category if label == "near_miss" else "paraphrase",
                          "label": label, "split": _split(index), "a": a, "b": b})
    return pairs


def load(path: Path = PAIRS_FILE, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PAIRS_FILE)
    parser.add_argument("--check", action="store_true", help="fail if the committed file is not what the seed gives")
    args = parser.parse_args()
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in generate())
    if args.check:
        if args.out.read_text() != text:
            raise SystemExit(f"{args.out} is not what `python -m tools.semantic_pairs` generates")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    rows = generate()
    for split in SPLITS:
        for label in ("paraphrase", "near_miss"):
            print(split, label, sum(1 for r in rows if r["split"] == split and r["label"] == label))


if __name__ == "__main__":
    main()

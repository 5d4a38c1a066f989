"""The content gate: a semantic candidate is served only if nothing in the two questions says they ask different
things. Cosine similarity of sentence vectors is high for "Celsius to Fahrenheit" and "Fahrenheit to Celsius",
for "enable" and "disable", for "reasons to" and "reasons not to": the vectors see the same words. The gate reads
what the vectors blur: numbers, negation, opposite words, the order of the things a question relates, named
entities, and a single word swapped in otherwise identical wording. Each check is a plain comparison of the two
texts (no model, microseconds); what it costs in paraphrases refused is measured on the labelled set
(bench/semantic_cache.py) and the threshold is calibrated with the gate in place (tools/calibrate_semantic.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Number words count as the numbers they name ("two bananas" against "three bananas"); "one" is left out, being as
# often a pronoun ("how do I write one?").
_NUMBER_WORDS = {"two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "dozen": "12", "hundred": "100"}
_WORD = re.compile(r"[A-Za-z][A-Za-z'+#.-]*[A-Za-z+#]|[A-Za-z]|\d+(?:[.,]\d+)?%?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?%?")
_NEGATIONS = frozenset({"not", "no", "never", "without", "none", "nothing", "cannot", "don't", "doesn't", "didn't",
                        "won't", "can't", "shouldn't", "isn't", "aren't", "wasn't", "weren't", "wouldn't",
                        "couldn't", "mustn't", "haven't", "hasn't", "unsafe", "avoid"})
# Words of opposite meaning in questions (verbs, then qualities); multi-word ones are matched as phrases.
_OPPOSITES: tuple[tuple[str, str], ...] = (
    ("enable", "disable"), ("turn on", "turn off"), ("switch on", "switch off"), ("install", "uninstall"),
    ("encrypt", "decrypt"), ("compress", "decompress"), ("lock", "unlock"), ("show", "hide"), ("upload", "download"),
    ("import", "export"), ("increase", "decrease"), ("start", "stop"), ("start", "end"), ("begin", "end"),
    ("add", "remove"), ("mute", "unmute"), ("merge", "split"), ("zoom in", "zoom out"), ("pin", "unpin"),
    ("archive", "unarchive"), ("block", "unblock"), ("open", "close"), ("connect", "disconnect"), ("buy", "sell"),
    ("push", "pull"), ("send", "receive"), ("win", "lose"), ("join", "leave"), ("subscribe", "unsubscribe"),
    ("follow", "unfollow"), ("allow", "deny"), ("accept", "reject"), ("include", "exclude"), ("min", "max"),
    ("minimum", "maximum"), ("pros", "cons"), ("advantages", "disadvantages"), ("benefits", "risks"),
    ("benefits", "drawbacks"), ("strengths", "weaknesses"), ("best", "worst"), ("largest", "smallest"),
    ("biggest", "smallest"), ("highest", "lowest"), ("longest", "shortest"), ("oldest", "newest"),
    ("oldest", "youngest"), ("hottest", "coldest"), ("deepest", "shallowest"), ("fastest", "slowest"),
    ("cheapest", "most expensive"), ("first", "last"), ("before", "after"), ("above", "below"),
    ("inside", "outside"), ("input", "output"), ("upper", "lower"), ("uppercase", "lowercase"),
    ("ascending", "descending"), ("key", "value"), ("keys", "values"), ("today", "tomorrow"),
    ("today", "yesterday"), ("yesterday", "tomorrow"), ("past", "future"), ("did", "will"), ("was", "will be"),
    ("north", "south"), ("east", "west"), ("left", "right"), ("true", "false"), ("odd", "even"),
    ("positive", "negative"), ("safe", "dangerous"), ("legal", "illegal"), ("healthy", "unhealthy"),
    ("short", "long"), ("shorter", "longer"), ("more", "less"), ("more", "fewer"), ("cheap", "expensive"),
)
# Words that open a question or a command: capitalised there without naming anything.
_OPENERS = _words("""what what's which who whom whose when where why how is are was were do does did can could
should would will shall may might tell name give list show convert calculate find explain describe compare
translate recipe cheapest budget population capital code guide shortcut sort in on at for if the a an my i please
weather number are is it's let's write make create get""")
# Words a paraphrase adds or drops without changing the question.
_FILLER = _words("""a an the of in on at to for from by with into onto and or is are was were be been do does
did can could should would will shall may might must i me my we our you your it its this that these those there
what what's which who whom how when where why please tell show give list name explain help way ways best simplest
easiest good main some any steps step guide example code formula method use using used way go get make find know
need want like just also here so then than as if about let's kind sort type""")


# When a question is asked: a different time is a different answer.
_TIMES = _words("""today tonight tomorrow yesterday weekend morning afternoon evening night monday tuesday
wednesday thursday friday saturday sunday now currently soon later""")


@dataclass(frozen=True)
class Reading:
    """What the gate compares, read once per text."""

    text: str
    words: tuple[str, ...]
    lowered: str
    vocabulary: frozenset[str]
    numbers: frozenset[str]
    negated: bool
    # Capitalised words past the first: names (a first word is capitalised anyway, so it proves nothing).
    names: frozenset[str]
    times: frozenset[str]


def _plain(word: str) -> str:
    word = word.lower()
    return word[:-2] if word.endswith("'s") else word


def read(text: str) -> Reading:
    words = tuple(_WORD.findall(text))
    plain = [_plain(w) for w in words]
    names = frozenset(p for i, (w, p) in enumerate(zip(words, plain, strict=True))
                      if i > 0 and w[0].isupper() and p not in _OPENERS and p not in _FILLER and p != "ok")
    # "15%" and "15 percent" are one number.
    numbers = frozenset([n.rstrip("%").replace(",", "") for n in _NUMBER.findall(text)]
                        + [_NUMBER_WORDS[p] for p in plain if p in _NUMBER_WORDS])
    return Reading(text, words, " " + " ".join(plain) + " ", frozenset(plain), numbers,
                   any(p in _NEGATIONS for p in plain), names, frozenset(p for p in plain if p in _TIMES))


def _has(reading: Reading, phrase: str) -> bool:
    return f" {phrase} " in reading.lowered


def _opposed(a: Reading, b: Reading) -> str | None:
    for x, y in _OPPOSITES:
        for one, other in ((x, y), (y, x)):
            if _has(a, one) and _has(b, other) and not _has(a, other) and not _has(b, one):
                return f"{one!r} against {other!r}"
    return None


def _order(a: Reading, b: Reading) -> str | None:
    """The things both relate, in a different order ("A to B" against "B to A")."""
    shared = [w.lower() for w in a.words if w.lower() in {v.lower() for v in b.words} and w.lower() not in _FILLER]
    first_a = {w: i for i, w in reversed(list(enumerate(w.lower() for w in a.words)))}
    first_b = {w: i for i, w in reversed(list(enumerate(w.lower() for w in b.words)))}
    related = [w for w in dict.fromkeys(shared) if _around_relation(a, w) and _around_relation(b, w)]
    for i, x in enumerate(related):
        for y in related[i + 1:]:
            if (first_a[x] < first_a[y]) != (first_b[x] < first_b[y]):
                return f"{x!r} and {y!r} in the other order"
    return None


def _around_relation(reading: Reading, word: str) -> bool:
    """A word right before or after 'to', 'into', 'from' or 'than': one side of a relation."""
    lowered = [w.lower() for w in reading.words]
    for i, w in enumerate(lowered):
        if w == word and ((i + 1 < len(lowered) and lowered[i + 1] in ("to", "into", "than"))
                          or (i > 0 and lowered[i - 1] in ("to", "into", "from", "than"))):
            return True
    return False


def _interchangeable(x: str, y: str) -> bool:
    """Filler words, or two ways of saying no ("cannot", "can't"): swapping them keeps the question."""
    return x in _FILLER or y in _FILLER or (x in _NEGATIONS and y in _NEGATIONS)


def _swapped_word(a: Reading, b: Reading) -> str | None:
    """Wording identical but for one content word each side (the question asks about something else), or the
    very same words in another order ("in German if the original is Spanish" against the reverse, "React or
    Vue" against "Vue or React"): whoever relates to whom has changed."""
    left = [w.lower() for w in a.words]
    right = [w.lower() for w in b.words]
    if len(left) != len(right):
        return None
    differing = [(x, y) for x, y in zip(left, right, strict=True) if x != y]
    if len(differing) == 1 and not _interchangeable(*differing[0]):
        return f"{differing[0][0]!r} swapped for {differing[0][1]!r}"
    if differing and sorted(left) == sorted(right):
        return f"the same words in another order: {[x for x, _ in differing]}"
    return None


def conflict(question: str, candidate: str) -> str | None:
    """Why `candidate`'s answer may not answer `question`; None when the gate finds nothing against it."""
    a, b = read(question), read(candidate)
    if a.numbers != b.numbers:
        return f"numbers differ: {sorted(a.numbers)} against {sorted(b.numbers)}"
    if a.negated != b.negated:
        return "one is negated, the other not"
    # A name in one question must be somewhere in the other ("Capital of Spain?" against "... of Norway").
    unmatched = (a.names - b.vocabulary) | (b.names - a.vocabulary)
    if unmatched:
        return f"names differ: {sorted(unmatched)}"
    if a.times != b.times:
        return f"times differ: {sorted(a.times ^ b.times)}"
    return _opposed(a, b) or _order(a, b) or _swapped_word(a, b)

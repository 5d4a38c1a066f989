"""The semantic cache's gate: a cached answer to a similar question is served only when every difference between
the two questions is explained. Cosine similarity of sentence vectors finds the candidates; it cannot decide,
because the vectors see the same words in "When did the Titanic sink?" and "Why did the Titanic sink?", in
"copy from the container to the host" and the reverse.

The two texts are aligned word by word. A content word is explained by a word of the other text that is the same
word, the same lemma in the same form (tense, degree), a synonym in WordNet 3.0's most frequent senses or the
paraphrase table, or a typo of a known word. Politeness, articles and question frames that ask the same thing
("how do I", "what are the steps to") may differ. The closed classes that change what is asked must be equal:
question words, quantifiers and scope, time words and tense, modality, negation, person, numbers, and the words
that give a relation its direction, with what they point at. The words both texts relate keep their order
outside the phrases a paraphrase may move ("in Python"). Anything left unexplained is a miss: a block list only
stops the differences its author thought of; this stops every difference it cannot vouch for.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from services.cache import gate_words as words
from services.cache.wordnet import DEFAULT_DIR, WordNet, load_wordnet

# WordNet synonyms only within each word's most frequent senses: "java" shares its second sense with "coffee".
SYNONYM_SENSES = 2
_TOKEN = re.compile("\u00a7quote|" r"\d+(?:[.,]\d+)*%?|[a-z][a-z0-9+#]*(?:'[a-z]+)?|[^\sa-z\d]", re.IGNORECASE)
_NUMERIC = re.compile(r"\d")
_CLAUSE_END = frozenset(".?!:;")
# A quoted phrase is the object of the question, compared as written: the question words inside "where is the
# station" are not the question's.
_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d|(?<![A-Za-z])\'([^\']+)\'(?![A-Za-z])')
_QUOTE_MARK = "\u00a7quote"


@dataclass(frozen=True)
class Word:
    text: str
    name: bool  # a name (capitalised past a clause's first word, or a listed product): matched exactly
    movable: bool  # inside a prepositional phrase or a possessive, which a paraphrase may move
    form: str  # base, past, comparative or superlative: the same lemma in another form is another question
    lemmas: frozenset[str]
    clause: int  # clauses may come in either order ("If I X, what happens?"), words within one may not
    plural: bool


@dataclass(frozen=True)
class Reading:
    questions: frozenset[str]
    quantifiers: tuple[str, ...]
    times: tuple[str, ...]
    numbers: tuple[str, ...]
    modals: frozenset[str]
    persons: frozenset[str]
    negations: int
    past: bool
    alternatives: int
    linkers: tuple[str, ...]
    quoted: tuple[str, ...]
    # (direction word, index of the content word it points at, or -1 for none, or a closed-class value)
    directions: tuple[tuple[str, int | str], ...]
    content: tuple[Word, ...]


@dataclass(frozen=True)
class _Raw:
    text: str
    capital: bool
    possessive: bool = False
    acronym: bool = False  # written in capitals ("US"): a name, never a function word


def _quotes(text: str) -> tuple[str, tuple[str, ...]]:
    """The text with each quoted phrase replaced by a mark, and the phrases, normalised."""
    found: list[str] = []

    def mark(match: re.Match) -> str:
        found.append(" ".join(next(g for g in match.groups() if g is not None).lower().split()))
        return f" {_QUOTE_MARK} "

    return _QUOTED.sub(mark, text), tuple(sorted(found))


def _tokens(text: str) -> list[_Raw]:
    """Lower-cased words with contractions expanded, each marked capitalised where that says it is a name."""
    raw: list[_Raw] = []
    clause_start = True
    for token in _TOKEN.findall(text.replace("\u2019", "'")):
        if token in _CLAUSE_END or token == ",":
            raw.append(_Raw(token, False))
            clause_start = token in _CLAUSE_END
            continue
        if token == "-":
            continue
        lowered = token.lower()
        capital = token[0].isupper() and not clause_start and lowered != "i"
        clause_start = False
        if lowered in words.CONTRACTIONS:
            raw.extend(_Raw(part, False) for part in words.CONTRACTIONS[lowered].split())
        elif lowered.endswith("n't"):
            raw += [_Raw(lowered[:-3], False), _Raw("not", False)]
        elif lowered.endswith("'s"):
            raw.append(_Raw(lowered[:-2], capital, possessive=True))
        elif "'" in lowered:
            stem, _, tail = lowered.partition("'")
            raw += [_Raw(stem, capital), _Raw({"re": "are", "ve": "have", "ll": "will", "d": "would",
                                               "m": "am"}.get(tail, tail), False)]
        else:
            acronym = len(token) > 1 and token.isupper() and token.isalpha()
            raw.append(_Raw(lowered, capital or acronym, acronym=acronym))
    return raw


def _frames(raw: list[_Raw]) -> list[_Raw]:
    """Multi-word frames replaced by their marker, longest first; opening frames only where a clause starts."""
    out: list[_Raw] = []
    i = 0
    clause_start = True
    while i < len(raw):
        for length in words.FRAME_LENGTHS.get(raw[i].text, ()):
            if i + length > len(raw):
                continue
            key = tuple(r.text for r in raw[i:i + length])
            marker = words.FRAME_WORDS.get(key) or (words.OPENING_FRAME_WORDS.get(key) if clause_start else None)
            if marker is not None:
                if marker != "@drop":
                    out.append(_Raw(marker, False))
                # "Can you explain X": the clause starts again after politeness.
                clause_start = clause_start and marker == "@drop"
                i += length
                break
        else:
            out.append(raw[i])
            clause_start = raw[i].text in _CLAUSE_END or raw[i].text == ","
            i += 1
    return out


class Gate:
    def __init__(self, wordnet: WordNet):
        self._wordnet = wordnet
        self.read = lru_cache(maxsize=16384)(self._read)

    def conflict(self, question: str, candidate: str) -> str | None:
        """Why `candidate`'s answer may not answer `question`; None when every difference is explained."""
        a, b = self.read(question), self.read(candidate)
        return _closed_classes(a, b) or self._content(a, b)

    def _form(self, word: str) -> str:
        if word in ("best", "worst", "most", "least"):
            return "superlative"
        if word in ("better", "worse", "more", "less"):
            return "comparative"
        if self._wordnet.past_form(word):
            return "past"
        if self._wordnet.is_lemma(word):
            return "base"
        adjectives = {lemma for pos, lemma in self._wordnet.lemmas(word) if pos == "adj"}
        if adjectives and word.endswith("est"):
            return "superlative"
        if adjectives and word.endswith("er"):
            return "comparative"
        return "base"

    def _read(self, text: str) -> Reading:
        unquoted, quoted = _quotes(text)
        raw = _frames(_tokens(unquoted))
        questions: set[str] = set()
        quantifiers: list[str] = []
        times: list[str] = []
        numbers: list[str] = []
        modals: set[str] = set()
        persons: set[str] = set()
        negations = 0
        past = False
        past_words = False
        present_copula = False
        alternatives = 0
        linkers: list[str] = []
        in_situ: list[str] = []  # question words past a clause's first content word
        clause_has_content = False
        clause = 0
        directions: list[tuple[str, int | str]] = []
        content: list[Word] = []
        pending: list[str] = []
        in_phrase = False

        def point(target: int | str) -> None:
            nonlocal pending
            directions.extend((direction, target) for direction in pending)
            pending = []

        def boundary() -> None:
            nonlocal in_phrase
            point(-1)
            in_phrase = False

        def content_seen() -> None:
            nonlocal clause_has_content
            clause_has_content = True

        for i, token in enumerate(raw):
            w = token.text
            following = raw[i + 1].text if i + 1 < len(raw) else ""
            if token.acronym and w not in words.NUMBER_WORDS:
                self._add_content(token, content, in_phrase, clause)
                point(len(content) - 1)
                content_seen()
            elif w in words.QUESTION_MARKERS:
                if clause_has_content:
                    in_situ.append(w)
                    clause += 1  # "what time is it in Tokyo | when it is noon in New York"
                else:
                    questions.add(w)
                boundary()
            elif w == _QUOTE_MARK:
                point("quoted")
                content_seen()
            elif w in words.LINKERS:
                linkers.append(words.LINKERS[w])
                boundary()
                clause += 1
            elif w in words.MODALS:
                # "How often should I water it?" asks what "How often do I water it?" asks: advice.
                if not (w == "@should" and i > 0 and raw[i - 1].text in words.QUESTION_MARKERS):
                    modals.add(words.MODALS[w])
                boundary()
            elif w in words.AUXILIARIES:
                past = past or words.AUXILIARIES[w] == "past"
                present_copula = present_copula or w in ("is", "are", "am", "be", "being")
                boundary()
            elif w in words.NEGATIONS:
                negations += 1
            elif w in words.NUMBER_WORDS or _NUMERIC.search(w):
                value = words.NUMBER_WORDS.get(w) or w.replace(",", "").rstrip("%")
                numbers.append(value)
                if w.endswith("%"):
                    numbers.append("%")
                point(f"#{value}")
            elif w in words.QUANTIFIERS:
                quantifiers.append(words.QUANTIFIERS[w])
            elif w in words.TIMES:
                times.append(words.TIMES[w])
                point(f"@{w}")
            elif w in words.ANAPHORIC:
                continue
            elif w in words.PERSONS and not token.acronym:
                persons.add(words.PERSONS[w])
                if w not in words.DETERMINERS:
                    point(f"person {words.PERSONS[w]}")
            elif w in words.OR_WORDS:
                alternatives += 1
                boundary()
            elif w in words.DIRECTIONS:
                if w == "to" and self._infinitive(following):
                    continue
                pending.append(words.SAME_DIRECTION.get(w, w))
                in_phrase = True
            elif w in words.LOOSE_PREPOSITIONS:
                in_phrase = True
            elif w in words.FILLER or not w:
                continue
            elif not w[0].isalnum():
                boundary()
                clause_has_content = False
                clause += 1
            else:
                if w == "free" and i > 0 and raw[i - 1].text not in words.FILLER:
                    negations += 1  # "gluten-free": the polarity of "contains gluten" turned
                added = self._add_content(token, content, in_phrase, clause)
                past_words = past_words or added.form == "past"
                point(len(content) - 1)
                content_seen()
        boundary()
        # "released last month" is past; "is it compressed" is a present passive, not a past question.
        past = past or (past_words and not present_copula)
        # "10 weeks is how many days?" asks with its only question word; in "How do you say X when translating"
        # the second one joins clauses.
        if questions:
            linkers += in_situ
        else:
            questions.update(in_situ)
        if len(questions) > 1:
            questions.discard("@what")  # "what is the number of" asks how many
        return Reading(frozenset(questions), tuple(sorted(quantifiers)), tuple(sorted(times)),
                       tuple(sorted(numbers)), frozenset(modals), frozenset(persons), negations, past, alternatives,
                       tuple(sorted(linkers)), quoted, tuple(directions), tuple(content))

    def _add_content(self, token: _Raw, content: list[Word], in_phrase: bool, clause: int) -> Word:
        w = token.text
        lemmas = frozenset(lemma for _, lemma in self._wordnet.lemmas(w)) | {w}
        if len(lemmas) == 1 and w.endswith("s") and len(w) > 3:
            lemmas |= {w[:-1]}  # a plural WordNet does not know ("dicts", "repos")
        plural = w.endswith("s") and not self._wordnet.is_lemma(w) and len(lemmas) > 1
        word = Word(w, token.capital or w in words.NAMES, in_phrase or token.possessive, self._form(w), lemmas,
                    clause, plural)
        content.append(word)
        return word

    def _infinitive(self, word: str) -> bool:
        """`to` before a word that can only be a verb marks an infinitive, not a direction."""
        parts = {pos for pos, _ in self._wordnet.lemmas(word)}
        return parts == {"verb"}

    def _explains(self, x: Word, y: Word) -> bool:
        if x.text == y.text:
            return True
        if x.form == y.form and any(y.lemmas & words.PARAPHRASE_GROUP.get(lemma, frozenset()) for lemma in x.lemmas):
            return True
        if x.name or y.name:
            return self._typo(x, y)
        if (x.lemmas & y.lemmas or _plural_of(x.text, y.text)) and x.form == y.form:
            return True
        # Tense is read for the whole question; a synonym must keep the degree ("tall" is not "highest").
        if _degree(x) != _degree(y):
            return False
        if self._wordnet.senses(x.text, SYNONYM_SENSES) & self._wordnet.senses(y.text, SYNONYM_SENSES):
            return True
        if any(self._wordnet.same_event(one, other) for one in x.lemmas for other in y.lemmas):
            return True
        return self._typo(x, y)

    def _known(self, word: Word) -> bool:
        return word.text in words.NAMES or self._wordnet.known(word.text)

    def _typo(self, x: Word, y: Word) -> bool:
        """A misspelling of the other word: one of the two is no word at all (nor a listed name), long enough that
        one edit cannot turn a word into another word, and not the other word with a prefix ("lock" / "unlock").
        A capitalised unknown word is a name of its own, not a typo."""
        typed, known = (x, y) if self._known(y) else (y, x)
        if self._known(typed) or not self._known(known) or (typed.name and typed.text not in words.NAMES
                                                             and typed.text[0] != known.text[0]):
            return False
        a, b = typed.text, known.text
        if min(len(a), len(b)) < 5 or a.endswith(b) or b.endswith(a):
            return False
        return _edit_distance(a, b) <= (2 if min(len(a), len(b)) >= 8 else 1)

    def _content(self, a: Reading, b: Reading) -> str | None:
        pairs, unexplained = _align(a.content, b.content, self._explains)
        unexplained = _joined_compounds(unexplained, a, b)
        restated = set().union(*(words.RESTATING.get(q, frozenset()) for q in a.questions | b.questions))
        unexplained = [w for w in unexplained if w not in restated]
        if unexplained:
            return f"not explained by the other question: {unexplained}"
        mapped = Counter((d, pairs.get(t, t) if isinstance(t, int) and t >= 0 else t) for d, t in a.directions)
        theirs = Counter(b.directions)
        if "from" in {d for d, _ in a.directions} ^ {d for d, _ in b.directions}:
            # "X to Y" says the same as "from X to Y": a "from" on one side only is read as implied.
            mapped = Counter({k: v for k, v in mapped.items() if k[0] != "from"})
            theirs = Counter({k: v for k, v in theirs.items() if k[0] != "from"})
        if mapped != theirs:
            return "a relation points elsewhere (to / from / for / as ...)"
        # A superlative picks one thing, or several: "the oldest university" is not "the oldest universities".
        if any(w.form == "superlative" for w in (*a.content, *b.content)) or \
                {"most", "least"} & {*a.quantifiers, *b.quantifiers}:
            for i, j in pairs.items():
                if a.content[i].plural != b.content[j].plural:
                    return f"one or several: {a.content[i].text!r} against {b.content[j].text!r}"
        reverse = {j: i for i, j in pairs.items()}
        if not (_clause_map_is_function(pairs, a, b) or _clause_map_is_function(reverse, b, a)):
            return "the clauses exchange their words"
        moved_out = [i for i, j in pairs.items() if a.content[i].movable and not b.content[j].movable]
        moved_in = [i for i, j in pairs.items() if not a.content[i].movable and b.content[j].movable]
        if moved_out and moved_in:
            # "in German if the original is Spanish" against the reverse: the two swapped roles.
            return f"{a.content[moved_out[0]].text!r} and {a.content[moved_in[0]].text!r} swap roles"
        # A superlative may stand before its noun or after it ("the largest park", "which park is the largest").
        core = [(i, j) for i, j in pairs.items() if not a.content[i].movable and not b.content[j].movable
                and a.content[i].form not in ("superlative", "comparative")]
        for first, (i, j) in enumerate(core):
            for k, m in core[first + 1:]:
                same_clause = a.content[i].clause == a.content[k].clause and b.content[j].clause == b.content[m].clause
                if same_clause and (i < k) != (j < m):
                    return f"{a.content[i].text!r} and {a.content[k].text!r} in the other order"
        return None


def _closed_classes(a: Reading, b: Reading) -> str | None:
    # No question word at all ("Celsius to Fahrenheit conversion", "Reset my password") asks for the thing itself:
    # read as "what" or "how", never as when / why / where / who / how many.
    if not a.questions or not b.questions:
        asked = a.questions or b.questions
        if asked - {"@what", "@how"}:
            return f"question word differs: {_show(a.questions)} against {_show(b.questions)}"
    elif a.questions != b.questions:
        return f"question word differs: {_show(a.questions)} against {_show(b.questions)}"
    checks = ( ("number", a.numbers, b.numbers),
              ("quantifier or scope", a.quantifiers, b.quantifiers), ("time", a.times, b.times),
              ("tense", a.past, b.past), ("modality", a.modals, b.modals),
              ("negation", a.negations % 2, b.negations % 2), ("alternatives", a.alternatives, b.alternatives),
              ("clause linker", a.linkers, b.linkers), ("quoted phrase", a.quoted, b.quoted))
    for name, x, y in checks:
        if x != y:
            return f"{name} differs: {_show(x)} against {_show(y)}"
    # "How do I reset my password" and "How to reset a password" ask the same: an impersonal question is read as
    # the asker's own.
    generic = frozenset({"1", "2"})
    if a.persons != b.persons and not ((not a.persons and b.persons <= generic)
                                       or (not b.persons and a.persons <= generic)):
        return f"person differs: {_show(a.persons)} against {_show(b.persons)}"
    return None


def _show(value: object) -> str:
    return str(sorted(value)) if isinstance(value, frozenset | tuple) else str(value)


def _align(left: tuple[Word, ...], right: tuple[Word, ...], explains) -> tuple[dict[int, int], list[str]]:
    """Pairs each word with one of the other side that explains it, the same word first; a word repeated on one
    side is explained by its twin's partner. Returns the pairs and the words nothing explains."""
    pairs: dict[int, int] = {}
    for strict in (True, False):
        for i, x in enumerate(left):
            if i in pairs:
                continue
            taken = set(pairs.values())
            for j, y in enumerate(right):
                if j not in taken and (x.text == y.text if strict else explains(x, y)):
                    pairs[i] = j
                    break
    paired_left = {left[i].text for i in pairs}
    paired_right = {right[j].text for j in pairs.values()}
    for i, x in enumerate(left):
        if i not in pairs and x.text in paired_left:
            pairs[i] = next(pairs[k] for k in pairs if left[k].text == x.text)
    taken = set(pairs.values())
    unexplained = [x.text for i, x in enumerate(left) if i not in pairs] + \
                  [y.text for j, y in enumerate(right) if j not in taken and y.text not in paired_right]
    return pairs, unexplained


def _joined_compounds(unexplained: list[str], a: Reading, b: Reading) -> list[str]:
    """A compound written as one word on one side and two on the other ("lightbulb" / "light bulb")."""
    left = set(unexplained)
    for one, other in ((a, b), (b, a)):
        texts = [w.text for w in other.content]
        for first, second in itertools.pairwise(texts):
            joined = first + second
            if left & {joined, first, second} and any(w.text == joined for w in one.content):
                left -= {joined, first, second}
    return [w for w in unexplained if w in left]


def _clause_map_is_function(pairs: dict[int, int], a: Reading, b: Reading) -> bool:
    """Each clause of `a` has its words in one clause of `b`: a's clauses group b's or match them."""
    target: dict[int, int] = {}
    for i, j in pairs.items():
        if target.setdefault(a.content[i].clause, b.content[j].clause) != b.content[j].clause:
            return False
    return True


def _degree(word: Word) -> str:
    return "base" if word.form == "past" else word.form


def _plural_of(x: str, y: str) -> bool:
    return x in (y + "s", y + "es") or y in (x + "s", x + "es")


def _edit_distance(x: str, y: str) -> int:
    """Damerau-Levenshtein (optimal string alignment): a swapped pair of letters is one typo."""
    rows = [[i + j if i * j == 0 else 0 for j in range(len(y) + 1)] for i in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            cost = 0 if x[i - 1] == y[j - 1] else 1
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and x[i - 1] == y[j - 2] and x[i - 2] == y[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[len(x)][len(y)]


@lru_cache(maxsize=4)
def load_gate(directory: Path = DEFAULT_DIR) -> Gate:
    """One gate per WordNet folder per process."""
    return Gate(load_wordnet(directory))

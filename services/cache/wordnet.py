"""WordNet 3.0 read from its database files (Debian's `wordnet-base` puts them in /usr/share/wordnet): which
lemmas a word form can be (morphy: the exception lists, then the detachment rules) and which synsets a lemma has,
in WordNet's sense order (most frequent first). The semantic cache's gate asks only these two things, so the
reader keeps only the index files and the exception lists (~25 MB of text, read once at start, ~1 s) and none of
the data files.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_DIR = Path("/usr/share/wordnet")
POS = ("noun", "verb", "adj", "adv")
# A noun derived from a verb names the same event when it ends like a nominalisation; "translator", "converter"
# name who does it, a different thing to ask about.
_EVENT_NOUN_ENDINGS = ("ion", "ment", "ing", "al", "ance", "ence", "age", "ure", "sis")
# morphy's detachment rules (wndb(5WN), "Morphy"): suffix -> replacement, per part of speech.
_DETACH: dict[str, tuple[tuple[str, str], ...]] = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
             ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}


class WordNetMissing(RuntimeError):
    """The database files are not where the settings say; the text says what to install."""


@dataclass(frozen=True)
class Sense:
    pos: str
    offset: int


class WordNet:
    def __init__(self, index: dict[str, dict[str, tuple[int, ...]]], exceptions: dict[str, dict[str, tuple[str, ...]]],
                 events: dict[str, frozenset[str]]):
        self._index = index  # pos -> lemma -> synset offsets, most frequent sense first
        self._exceptions = exceptions  # pos -> inflected form -> lemmas
        self._events = events  # verb <-> the nouns that name its event, both ways

    @classmethod
    def load(cls, directory: Path = DEFAULT_DIR) -> WordNet:
        missing = [f"index.{pos}" for pos in POS if not (directory / f"index.{pos}").is_file()]
        if missing:
            raise WordNetMissing(
                f"WordNet 3.0 is not in {directory} (missing {', '.join(missing)}): install Debian's wordnet-base "
                "package (apt-get install wordnet-base) or point MESH_CACHE_WORDNET_DIR at a WordNet 3.0 dict folder")
        index: dict[str, dict[str, tuple[int, ...]]] = {}
        exceptions: dict[str, dict[str, tuple[str, ...]]] = {}
        for pos in POS:
            index[pos] = _read_index(directory / f"index.{pos}")
            exc = directory / f"{pos}.exc"
            exceptions[pos] = _read_exceptions(exc) if exc.is_file() else {}
        events = _read_events(directory / "data.verb") if (directory / "data.verb").is_file() else {}
        return cls(index, exceptions, events)

    def same_event(self, verb_or_noun: str, other: str) -> bool:
        """A verb and the noun naming its event ("convert" / "conversion"), either way round."""
        return other in self._events.get(verb_or_noun, ())

    def known(self, word: str) -> bool:
        """A lemma of WordNet, or a form morphy reduces to one."""
        return bool(self.lemmas(word))

    @lru_cache(maxsize=65536)  # noqa: B019 - one WordNet per process, held for its life
    def lemmas(self, word: str) -> frozenset[tuple[str, str]]:
        """(part of speech, lemma) pairs the form can be."""
        word = word.lower().replace(" ", "_")
        found: set[tuple[str, str]] = set()
        for pos in POS:
            entries = self._index[pos]
            if word in entries:
                found.add((pos, word))
            for lemma in self._exceptions[pos].get(word, ()):
                if lemma in entries:
                    found.add((pos, lemma))
            for suffix, replacement in _DETACH[pos]:
                if word.endswith(suffix) and len(word) > len(suffix) + 1:
                    lemma = word[: len(word) - len(suffix)] + replacement
                    if lemma in entries:
                        found.add((pos, lemma))
        return frozenset(found)

    def is_lemma(self, word: str) -> bool:
        """The form itself is a lemma (not only an inflection of one)."""
        word = word.lower()
        return any(word in self._index[pos] for pos in POS)

    def past_form(self, word: str) -> bool:
        """A verb's past form: regular ("released", "discovered", also where WordNet lists the participle as an
        adjective), or irregular and not a lemma of its own ("sank"; not "found", "left")."""
        word = word.lower()
        if word.endswith("ed") and any(pos == "verb" and lemma != word for pos, lemma in self.lemmas(word)):
            return True
        return word in self._exceptions["verb"] and not word.endswith(("s", "ing")) and not self.is_lemma(word)

    @lru_cache(maxsize=65536)  # noqa: B019 - one WordNet per process, held for its life
    def senses(self, word: str, most: int) -> frozenset[Sense]:
        """The `most` most frequent senses of each lemma the form can be."""
        found: set[Sense] = set()
        for pos, lemma in self.lemmas(word):
            found.update(Sense(pos, offset) for offset in self._index[pos][lemma][:most])
        return frozenset(found)


def _read_index(path: Path) -> dict[str, tuple[int, ...]]:
    """index.pos lines: lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset..."""
    entries: dict[str, tuple[int, ...]] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith(" "):
                continue  # the licence header
            fields = line.split()
            synsets = int(fields[2])
            entries[fields[0]] = tuple(int(offset) for offset in fields[len(fields) - synsets:])
    return entries


def _read_events(path: Path) -> dict[str, frozenset[str]]:
    """Derivational pointers ("+") from verbs to nouns in data.verb, kept where the noun names the event. A data
    line: offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [symbol offset pos source/target]..."""
    pointers: list[tuple[str, int, int]] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith(" "):
                continue
            fields = line.split("|", 1)[0].split()
            count = int(fields[3], 16)
            verbs = [fields[4 + 2 * i].lower() for i in range(count)]
            k = 4 + 2 * count
            for _ in range(int(fields[k])):
                symbol, offset, pos, ends = fields[k + 1:k + 5]
                k += 4
                if symbol == "+" and pos == "n":
                    source, target = int(ends[:2], 16), int(ends[2:], 16)
                    if 0 < source <= len(verbs):
                        pointers.append((verbs[source - 1], int(offset), target))
    wanted = {offset for _, offset, _ in pointers}
    nouns: dict[int, list[str]] = {}
    with path.with_name("data.noun").open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith(" "):
                continue
            offset = int(line[:8])
            if offset in wanted:
                fields = line.split()
                nouns[offset] = [fields[4 + 2 * i].lower() for i in range(int(fields[3], 16))]
    events: dict[str, set[str]] = {}
    for verb, offset, target in pointers:
        names = nouns.get(offset, [])
        noun = names[target - 1] if 0 < target <= len(names) else ""
        if noun.endswith(_EVENT_NOUN_ENDINGS) and noun != verb:
            events.setdefault(verb, set()).add(noun)
            events.setdefault(noun, set()).add(verb)
    return {word: frozenset(related) for word, related in events.items()}


def _read_exceptions(path: Path) -> dict[str, tuple[str, ...]]:
    exceptions: dict[str, tuple[str, ...]] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            form, *lemmas = line.split()
            exceptions[form] = tuple(lemmas)
    return exceptions


@lru_cache(maxsize=4)
def load_wordnet(directory: Path = DEFAULT_DIR) -> WordNet:
    """One WordNet per folder per process."""
    return WordNet.load(directory)

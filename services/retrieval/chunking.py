"""Chunks that follow the document: sections by heading, then paragraphs, sentences, and only last token windows.

Each chunk keeps the path of headings above it, so a fact in a table or a list stays with its title; the path is
put in front of the chunk's text (what is embedded and what BM25 reads) and returned with every hit. Sizes are
counted in the embedder's own tokens, and chunk text is cut from the original at its offsets (nothing rewritten).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers import Tokenizer

from services.retrieval.lexical import unglue

HEADING_SEPARATOR = " > "

_MARKDOWN_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_TABLE_ROW = re.compile(r"^\s*\|")
_RULE = re.compile(r"^\s*([-*_=])(\s*\1){2,}\s*$")
_LIST_ITEM = re.compile(r"^\s*([-*+•‣◦▪]|\d+[.)])\s")
# A sentence ends at . ! ? (and a closing quote or bracket) followed by space and a capital, digit or opener;
# a field starts where text flattened from a form glued "Label: value" pairs together ("…connectionsHealth
# Check: Use…").
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[•])"
                           r"|(?<=[a-z0-9)%\"])(?=[A-Z][A-Za-z/ -]{1,40}: )")
_TITLE_MAX_CHARS = 80
_TITLE_MAX_WORDS = 10
# A plain-text title sits below every Markdown heading level.
_PLAIN_TITLE_LEVEL = 7


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str                     # the heading path's line, then the body as written in the document
    headings: tuple[str, ...]     # outermost first
    # What is searched for this chunk: consecutive pieces of it, each with the heading path (the whole chunk when
    # passages are off or it is small). A passage found returns its chunk ("small to big").
    passages: tuple[str, ...] = ()

    @property
    def heading_path(self) -> str:
        return HEADING_SEPARATOR.join(self.headings)


@dataclass(frozen=True)
class _Line:
    start: int
    end: int
    text: str


@dataclass
class _Section:
    headings: tuple[str, ...]
    blocks: list[tuple[int, int]]   # paragraphs, tables and list runs: spans of the original text


def _lines(text: str) -> list[_Line]:
    lines, start = [], 0
    for raw in text.splitlines(keepends=True):
        body = raw.rstrip("\r\n")
        lines.append(_Line(start, start + len(body), body))
        start += len(raw)
    return lines


def _plain_title(line: str, following: str | None) -> bool:
    """A short line without sentence punctuation, followed by longer text: a title in a document without
    Markdown ("Cache Layer" above its description). A line just above a table titles that table."""
    stripped = line.strip()
    if following is not None and _TABLE_ROW.match(following) and not _TABLE_ROW.match(line):
        return 0 < len(stripped) <= 200
    if not stripped or following is None or not following.strip():
        return False
    if len(stripped) > _TITLE_MAX_CHARS or len(stripped.split()) > _TITLE_MAX_WORDS:
        return False
    if stripped[-1] in ".,;!?\"'`)]}>" or not stripped[0].isupper():
        return False
    if _LIST_ITEM.match(line) or _TABLE_ROW.match(line) or any(c in stripped for c in "=(){}[]<>`"):
        return False
    return len(following.strip()) > len(stripped)


def _sections(text: str) -> list[_Section]:
    lines = _lines(text)
    sections: list[_Section] = []
    stack: list[tuple[int, str]] = []
    current = _Section((), [])
    block_start: int | None = None
    block_end = 0
    block_kind = ""

    def close_block() -> None:
        nonlocal block_start
        if block_start is not None:
            current.blocks.append((block_start, block_end))
            block_start = None

    def open_section(level: int, title: str) -> None:
        nonlocal current
        close_block()
        if current.blocks:
            sections.append(current)
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title.rstrip(":").strip()))
        current = _Section(tuple(t for _, t in stack), [])

    # The next non-blank line after each line, in one pass from the end (a search from every line was quadratic
    # in the document's lines).
    next_text: list[str | None] = [None] * len(lines)
    upcoming: str | None = None
    for i in range(len(lines) - 1, -1, -1):
        next_text[i] = upcoming
        if lines[i].text.strip():
            upcoming = lines[i].text
    in_fence = False
    for i, line in enumerate(lines):
        if _FENCE.match(line.text):
            in_fence = not in_fence
        following = next_text[i]
        # A "#" line counts as a heading after a blank line only: inside code it is a comment.
        after_blank = i == 0 or not lines[i - 1].text.strip()
        markdown = None if in_fence or not after_blank else _MARKDOWN_HEADING.match(line.text)
        if markdown:
            open_section(len(markdown.group(1)), markdown.group(2))
            continue
        if not line.text.strip() or _RULE.match(line.text):
            close_block()
            continue
        if not in_fence and _plain_title(line.text, following):
            open_section(_PLAIN_TITLE_LEVEL, line.text.strip())
            continue
        kind = "table" if _TABLE_ROW.match(line.text) else "list" if _LIST_ITEM.match(line.text) else "text"
        # Without blank lines (many real documents), each line is its own paragraph; table rows and list
        # items stay together as one block under their title.
        if block_start is not None and (kind != block_kind or kind == "text"):
            close_block()
        if block_start is None:
            block_start, block_kind = line.start, kind
        block_end = line.end
    close_block()
    if current.blocks:
        sections.append(current)
    return sections


class Chunker:
    """size/overlap: the chunks returned to callers; passage_size: the pieces of a chunk that are embedded and
    matched (0: the whole chunk)."""

    def __init__(self, tokenizer_file: str, size: int, overlap: int, passage_size: int = 0) -> None:
        if not 0 <= overlap < size:
            raise ValueError(f"chunk overlap {overlap} must be in [0, {size})")
        if not 0 <= passage_size <= size:
            raise ValueError(f"passage size {passage_size} must be in [0, {size}]")
        self._tokenizer = Tokenizer.from_file(tokenizer_file)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.size = size
        self.overlap = overlap
        self.passage_size = passage_size

    def _token_spans(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        encoding = self._tokenizer.encode(text[start:end])
        return [(start + a, start + b) for (a, b), special
                in zip(encoding.offsets, encoding.special_tokens_mask, strict=True) if not special]

    def _units(self, text: str, start: int, end: int, budget: int, overlap: int) -> list[tuple[int, int, int]]:
        """(start, end, tokens) pieces of one block, none over the budget: the block itself, else its lines
        (table rows, list items), else sentences, else token windows."""
        tokens = len(self._token_spans(text, start, end))
        if tokens <= budget:
            return [(start, end, tokens)] if tokens else []
        pieces: list[tuple[int, int]] = []
        block = text[start:end]
        if "\n" in block.strip():
            offset = start
            for line in block.splitlines(keepends=True):
                if line.strip():
                    pieces.append((offset, offset + len(line.rstrip("\r\n"))))
                offset += len(line)
        else:
            cut = start
            for match in _SENTENCE_END.finditer(block):
                pieces.append((cut, start + match.start()))
                cut = start + match.end()
            pieces.append((cut, end))
        if len(pieces) > 1:
            return [unit for a, b in pieces for unit in self._units(text, a, b, budget, overlap)]
        spans = self._token_spans(text, start, end)
        step = max(1, budget - min(overlap, budget // 2))
        windows = []
        for first in range(0, len(spans), step):
            window = spans[first:first + budget]
            windows.append((window[0][0], window[-1][1], len(window)))
            if first + budget >= len(spans):
                break
        return windows

    def split(self, text: str) -> list[Chunk]:
        chunks: list[Chunk] = []
        for section in _sections(text):
            prefix = HEADING_SEPARATOR.join(section.headings)
            prefix_tokens = len(self._token_spans(prefix, 0, len(prefix))) if prefix else 0
            budget = max(self.size - prefix_tokens, self.size // 2)
            units = [u for start, end in section.blocks for u in self._units(text, start, end, budget, self.overlap)]
            for first, last in self._pack(units, budget, self.overlap):
                body = text[units[first][0]:units[last][1]].strip()
                passages = self._passages(text, units[first:last + 1], prefix, prefix_tokens)
                chunks.append(Chunk(len(chunks), _titled(prefix, body), section.headings, passages))
        return chunks

    def _passages(self, text: str, units: list[tuple[int, int, int]], prefix: str,
                  prefix_tokens: int) -> tuple[str, ...]:
        whole = _titled(prefix, text[units[0][0]:units[-1][1]].strip())
        if not self.passage_size or sum(u[2] for u in units) + prefix_tokens <= self.passage_size:
            return (unglue(whole),)
        budget = max(self.passage_size - prefix_tokens, self.passage_size // 2)
        pieces = [p for start, end, _ in units for p in self._units(text, start, end, budget, 0)]
        return tuple(unglue(_titled(prefix, text[pieces[first][0]:pieces[last][1]].strip()))
                     for first, last in self._pack(pieces, budget, 0))

    @staticmethod
    def _pack(units: list[tuple[int, int, int]], budget: int, overlap: int) -> list[tuple[int, int]]:
        """Consecutive units into groups (first, last) of at most `budget` tokens; the next group repeats the
        last units of the previous one up to `overlap` tokens, so a fact cut at a boundary is whole in one."""
        packed: list[tuple[int, int]] = []
        first = 0
        while first < len(units):
            last, used = first, units[first][2]
            while last + 1 < len(units) and used + units[last + 1][2] <= budget:
                last += 1
                used += units[last][2]
            packed.append((first, last))
            if last + 1 >= len(units):
                break
            carried, back, following = 0, last + 1, units[last + 1][2]
            while back - 1 > first and carried + units[back - 1][2] <= min(overlap, budget - following):
                back -= 1
                carried += units[back][2]
            first = back
        return packed


def _titled(prefix: str, body: str) -> str:
    return f"{prefix}\n{body}" if prefix else body

"""A batch input file checked line by line as it is uploaded: JSON Lines of {custom_id, method, url, body}, as
OpenAI's Batch API takes them. The first problem is refused with its line number; a file that is refused leaves
nothing behind. What a line's body asks of a model is checked when the line runs, as for any request: a bad
body is that line's error in the batch's error file, not the whole file's."""

from __future__ import annotations

import json
from dataclasses import dataclass

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID = 512


class BadFile(ValueError):
    """What is wrong with an uploaded file, for the caller (the line number is 1-based, as an editor shows it)."""


@dataclass(frozen=True)
class InputLine:
    number: int
    custom_id: str
    url: str
    model: str
    body: str       # the request body, as compact JSON


def parse(data: bytes, max_line_bytes: int, max_lines: int) -> list[InputLine]:
    if not data.strip():
        raise BadFile("the file is empty: a batch file holds one JSON request per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFile(f"the file is not UTF-8 text (byte {exc.start}): a batch file is JSON Lines") from None
    lines: list[InputLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(raw.encode()) > max_line_bytes:
            raise BadFile(f"line {number} is {len(raw.encode())} bytes, over this deployment's {max_line_bytes} "
                          "per line")
        if len(lines) == max_lines:
            raise BadFile(f"the file holds more than {max_lines} requests, this deployment's most per batch")
        lines.append(_line(number, raw, seen))
    return lines


def _line(number: int, raw: str, seen: set[str]) -> InputLine:
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise BadFile(f"line {number} is not JSON ({exc.msg} at column {exc.colno}): a batch file is JSON Lines, "
                      "one request object per line") from None
    if not isinstance(parsed, dict):
        raise BadFile(f"line {number} is not a JSON object")
    unknown = sorted(set(parsed) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise BadFile(f"line {number} has fields a batch request does not: {', '.join(unknown)[:200]}")
    custom_id = parsed.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise BadFile(f"line {number}: custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters")
    if custom_id in seen:
        raise BadFile(f"line {number}: custom_id {custom_id[:80]!r} is used twice; each request needs its own")
    seen.add(custom_id)
    if parsed.get("method") != "POST":
        raise BadFile(f"line {number}: method must be \"POST\"")
    url = parsed.get("url")
    if url not in ENDPOINTS:
        raise BadFile(f"line {number}: url {str(url)[:80]!r} is not one a batch can call: {', '.join(ENDPOINTS)}")
    body = parsed.get("body")
    if not isinstance(body, dict):
        raise BadFile(f"line {number}: body must be a JSON object (the request {url} takes)")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadFile(f"line {number}: body.model must name a model")
    return InputLine(number, custom_id, url, model, json.dumps(body, ensure_ascii=False, separators=(",", ":")))

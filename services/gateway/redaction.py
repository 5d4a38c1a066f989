"""Masks what must not reach a log: email addresses, phone numbers, API keys, bearer tokens, JWTs, private keys.

Prompts and completions are never logged unless a service is told to (MESH_GATEWAY_LOG_PROMPTS=true), and then
only through redact(). Patterns err on the side of masking: a long digit run that is not a phone number is still
masked.
"""

from __future__ import annotations

import re

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), "[PRIVATE KEY]"),
    (re.compile(r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}"), "[JWT]"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]{8,}"), r"\1 [TOKEN]"),
    (re.compile(r"\b(?:sk|pk|rk|api|key|token|ghp|gho|xox[abp])[-_][\w-]{12,}\b", re.I), "[API KEY]"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "[API KEY]"),
    (re.compile(r"(?i)\b(api[_-]?key|secret|password|passwd|token)(\s*[:=]\s*)\S+"), r"\1\2[SECRET]"),
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[EMAIL]"),
    # Phone numbers: optional +country, then 7-15 digits with spaces, dots, dashes or brackets between.
    (re.compile(r"(?<![\w])\+?\(?\d{1,4}\)?(?:[\s.-]?\(?\d{2,4}\)?){2,5}(?![\w])"), "[PHONE]"),
    (re.compile(r"\b[0-9a-f]{32,}\b", re.I), "[HEX SECRET]"),
]


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text

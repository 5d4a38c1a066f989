"""The grammar rule the CPU model decodes `"format": "date"` under admits exactly the calendar's dates."""

from __future__ import annotations

import datetime
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _rule() -> str:
    spec = importlib.util.spec_from_file_location("calendar_date", ROOT / "triton_models/smollm2/1/calendar_date.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CALENDAR_DATE


def _as_regex(gbnf_rule: str) -> re.Pattern[str]:
    """The rule's body (literals, character classes, groups, alternatives: all it uses) as a regular expression."""
    body = gbnf_rule.split("::=", 1)[1]
    pieces = re.findall(r'"[^"]*"|\[[^\]]*\]|[()|]|\S', body)
    assert all(p.startswith(('"', "[")) or p in "()|" for p in pieces), pieces
    return re.compile("".join(re.escape(p[1:-1]) if p.startswith('"') else p for p in pieces))


def test_every_date_of_eight_centuries_and_nothing_else():
    date = _as_regex(_rule())
    for year in [*range(1596, 2405), *range(0, 120), 400, 800, 9996, 9999]:
        for month in range(1, 13):
            for day in range(1, 32):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                try:
                    real = datetime.date.fromisoformat(text) is not None
                except ValueError:
                    real = False
                assert bool(date.fullmatch(text)) == real, text
    for wrong in ("2024-00-10", "2024-13-01", "2024-01-00", "2024-1-01", "99-01-01", "0000-01-01"):
        assert not date.fullmatch(wrong)

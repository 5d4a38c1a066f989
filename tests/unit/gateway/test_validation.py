"""Request validation (services/gateway/validation.py)."""

from __future__ import annotations

import pytest

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.gateway.settings import RequestLimits
from services.gateway.validation import check_embed, check_generate


def test_validation_limits():
    limits = RequestLimits()
    model = models_pb2.ModelInfo(name="llm", max_output_tokens=64)
    ok = mesh_pb2.GenerateRequest(model="llm", max_tokens=64,
                                  messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content="hi")])
    check_generate(ok, model, limits)
    nan = mesh_pb2.GenerateRequest()
    nan.CopyFrom(ok)
    nan.temperature = float("nan")
    with pytest.raises(Exception, match="temperature"):
        check_generate(nan, model, limits)
    check_embed(mesh_pb2.EmbedRequest(model="e", texts=["a"] * limits.max_embed_batch), limits)
    with pytest.raises(Exception, match="the limit is 256"):
        check_embed(mesh_pb2.EmbedRequest(model="e", texts=["a"] * (limits.max_embed_batch + 1)), limits)

"""What the gateway tells the router about a request: the model version (canary, sticky), the session, and the
key of the request's long shared prefix (prefix affinity); and the member of a model group (cascade)."""

from __future__ import annotations

import hashlib

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.router.canary import choose_version


def with_version(model: models_pb2.ModelInfo, sticky_key: str) -> models_pb2.ModelInfo:
    """The model with the version this caller gets. Chosen here, before the cache, so that a cached answer is
    only ever one of the version the caller would be routed to."""
    if not model.version_weights:
        return model
    chosen = models_pb2.ModelInfo()
    chosen.CopyFrom(model)
    chosen.version = choose_version(model.name, model.version_weights, sticky_key, model.version)
    return chosen


def affinity_key(request: mesh_pb2.GenerateRequest, min_prefix_chars: int) -> str:
    """The session, or a digest of a long system prompt: what a replica's KV-prefix cache can reuse."""
    if request.session_id:
        return "session:" + request.session_id
    first = request.messages[0] if request.messages else None
    if first is not None and first.role == mesh_pb2.ROLE_SYSTEM and len(first.content) >= min_prefix_chars:
        return "prefix:" + hashlib.blake2b(first.content.encode(), digest_size=12).hexdigest()
    return ""


def group_member(group: models_pb2.ModelGroup, request: mesh_pb2.GenerateRequest) -> str:
    """The cascade rule: the large model for high quality or a long prompt, else the small one."""
    if group.large_for_high_quality and request.quality == mesh_pb2.QUALITY_TIER_HIGH:
        return group.large
    prompt_chars = sum(len(m.content) for m in request.messages)
    if group.large_above_prompt_chars and prompt_chars > group.large_above_prompt_chars:
        return group.large
    return group.small

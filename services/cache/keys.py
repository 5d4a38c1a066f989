"""Cache keys: a hash of everything that decides the answer, scoped by tenant, model, version, generation. The
cache service writes under them; gateways read exact entries under them directly (services/cache/reads.py)."""

from __future__ import annotations

import hashlib
import json
import re

from inference_mesh.v1 import cache_pb2, mesh_pb2
from services.common.redis_connection import slot_tag


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _sampling(request: mesh_pb2.GenerateRequest) -> dict:
    sampling = {
        "max_tokens": request.max_tokens,
        "temperature": round(request.temperature, 6) if request.HasField("temperature") else None,
        "top_p": round(request.top_p, 6) if request.HasField("top_p") else None,
        "seed": request.seed if request.HasField("seed") else None,
        "stop": list(request.stop),
    }
    answer_format = request.response_format
    if answer_format.type != mesh_pb2.ResponseFormat.TYPE_TEXT:
        # Only when set, so free-text entries keep the keys they had. The schema text as sent: another key order
        # is another answer (keys are written in the schema's order), and strict changes what was checked.
        sampling["response_format"] = [answer_format.type, answer_format.schema, answer_format.strict]
    if request.tools:
        sampling["tools"] = [[t.name, t.description, t.parameters, t.strict] for t in request.tools]
        sampling["tool_choice"] = [request.tool_choice.mode, request.tool_choice.function,
                                   request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None]
    return sampling


def normalise(text: str) -> str:
    # Whitespace differences do not change the answer; case and punctuation may.
    return " ".join(text.split())


def _message(message: mesh_pb2.ChatMessage) -> tuple:
    if not message.tool_calls and not message.tool_call_id:
        return message.role, normalise(message.content)
    # The calls made and the call answered decide the next answer as much as the text does.
    return (message.role, normalise(message.content), [[c.name, c.arguments] for c in message.tool_calls],
            message.tool_call_id)


def messages(request: mesh_pb2.GenerateRequest) -> list[tuple]:
    return [_message(m) for m in request.messages]


def is_deterministic(request: mesh_pb2.GenerateRequest) -> bool:
    return (request.HasField("temperature") and request.temperature == 0.0) or request.HasField("seed")


def exact_digest(request: mesh_pb2.GenerateRequest) -> str:
    return _digest({"messages": messages(request), "sampling": _sampling(request)})


def user_text(request: mesh_pb2.GenerateRequest) -> str:
    """The last user message: the only part a semantic match may differ in."""
    for message in reversed(request.messages):
        if message.role == mesh_pb2.ROLE_USER:
            return normalise(message.content)
    return ""


def context_digest(request: mesh_pb2.GenerateRequest) -> str:
    """Everything but the last user message: system prompt, history, sampling. A semantic hit must match it."""
    items = messages(request)
    last_user = max((i for i, item in enumerate(items) if item[0] == mesh_pb2.ROLE_USER), default=-1)
    return _digest({"messages": [m if i != last_user else (m[0], "<user>") for i, m in enumerate(items)],
                    "sampling": _sampling(request)})


def scope_prefix(scope: cache_pb2.CacheScope, generation: str) -> str:
    # The tenant's hash tag: on a Redis Cluster every entry, lease and flush counter of a tenant share one slot,
    # so a read of entries and the tenant's counter stays one atomic MGET.
    return f"{slot_tag(scope.tenant)}:{scope.model}:{scope.model_version}:{generation}"


def response_key_of(scope: cache_pb2.CacheScope, generation: str, digest: str) -> str:
    return f"mesh:resp:{scope_prefix(scope, generation)}:{digest}"


def response_key(scope: cache_pb2.CacheScope, generation: str, request: mesh_pb2.GenerateRequest) -> str:
    return response_key_of(scope, generation, exact_digest(request))


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embedding_key_of(scope: cache_pb2.CacheScope, generation: str, digest: str) -> str:
    return f"mesh:emb:{scope_prefix(scope, generation)}:{digest}"


def embedding_key(scope: cache_pb2.CacheScope, generation: str, text: str) -> str:
    return embedding_key_of(scope, generation, text_digest(text))


# The Redis user a gateway reads exact entries as: GET and MGET of responses, embeddings and flush counters, and
# nothing else (no writes, no leases, no other keys). Local stack and compose both create it from this.
GATEWAY_READER = "gateway"
GATEWAY_READER_RULES = ("~mesh:resp:*", "~mesh:emb:*", "~mesh:gen:*", "resetchannels", "-@all", "+get", "+mget")


# Stored responses' ids: what the gateway makes, and all a key may hold after the tenant's tag.
STORED_RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{24}$")


def stored_response_key(tenant: str, response_id: str) -> str:
    if not STORED_RESPONSE_ID.match(response_id):
        raise ValueError(f"not a stored response id: {response_id[:40]!r}")
    return f"mesh:stored:{slot_tag(tenant)}:{response_id}"


def lease_key(key: str) -> str:
    return f"mesh:lease:{key}"


def tenant_generation_key(tenant: str) -> str:
    return f"mesh:gen:tenant:{slot_tag(tenant)}"


def model_generation_key(model: str) -> str:
    return f"mesh:gen:model:{model}"


def semantic_entry(key: str) -> str:
    """The semantic index's row id for the exact entry `key`: what a semantic hit names."""
    return hashlib.sha256(key.encode()).hexdigest()


def wrong_hits_key(key: str) -> str:
    """The semantic entries reported as wrong answers to the question whose exact entry is `key`."""
    return f"mesh:wrong:{key}"


# Reported (question, wrong candidate) pairs, newest first: negative examples for the next calibration.
NEGATIVES_KEY = "mesh:semantic:negatives"

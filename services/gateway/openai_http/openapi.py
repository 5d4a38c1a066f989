"""The OpenAPI 3.1 document of the routes the mesh implements (GET /v1/openapi.json), made from the same pydantic
models that parse the bodies: what it says is what the gateway accepts. The edge is fuzzed from it
(tests/integration/test_openapi_fuzz.py)."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.gateway.openai_http.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    CreateBatchRequest,
    EmbeddingRequest,
    ResponsesRequest,
    WrongHitReport,
)
from services.gateway.version import MESH_VERSION

_REF = "#/components/schemas/{model}"
_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}},
}
# What a caller may be answered besides success: OpenAI's statuses for the mesh's gRPC ones (errors.py).
_FAILURES = {"400": "invalid request", "401": "no valid credential", "404": "unknown model or route",
             "413": "body over 8 MiB", "429": "rate limit or token budget (retry-after)",
             "503": "unavailable (retry)", "504": "deadline exceeded"}
_ANY_OBJECT = {"type": "object"}


def _failures() -> dict[str, Any]:
    return {status: {"description": why, "content": {"application/json": {"schema": {"$ref": _REF.format(
        model="Error")}}}} for status, why in _FAILURES.items()}


def _post(summary: str, body: type[BaseModel], streams: bool = False) -> dict[str, Any]:
    answers = {"application/json": {"schema": _ANY_OBJECT}}
    if streams:
        answers["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": _REF.format(model=body.__name__)}}}},
        "responses": {"200": {"description": "answered", "content": answers}, **_failures()},
    }}


def _get(summary: str, parameters: list[dict[str, Any]] | None = None, method: str = "get") -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "answered", "content": {"application/json": {"schema": _ANY_OBJECT}}},
        **_failures()}}
    if parameters:
        operation["parameters"] = parameters
    return {method: operation}


def _id(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]


# Cursor paging as OpenAI's lists page (`limit` 1..100, `after` an id of the page before).
_PAGE = [{"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 100}},
         {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}}]
_UPLOAD = {"summary": "Upload a JSON Lines file of requests (purpose \"batch\")",
           "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
               "type": "object", "required": ["file", "purpose"],
               "properties": {"file": {"type": "string", "format": "binary"},
                              "purpose": {"type": "string", "enum": ["batch"]}}}}}},
           "responses": {"200": {"description": "stored", "content": {"application/json": {
               "schema": _ANY_OBJECT}}}, **_failures()}}


@cache
def document() -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(model, "validation") for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                             WrongHitReport, ResponsesRequest, CreateBatchRequest)],
        ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "inference mesh: OpenAI-compatible API", "version": MESH_VERSION,
                 "description": "The routes the mesh implements (docs/openai-api.md); the mesh's own options are "
                                "extra body fields."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {**definitions.get("$defs", {}), "Error": _ERROR},
        },
        "paths": {
            "/v1/chat/completions": _post("Chat completion (stream: server-sent events)", ChatCompletionRequest,
                                          streams=True),
            "/v1/completions": _post("Text completion (stream: server-sent events)", CompletionRequest, streams=True),
            "/v1/embeddings": _post("Embeddings", EmbeddingRequest),
            "/v1/responses": _post("A response (stream: server-sent events)", ResponsesRequest, streams=True),
            "/v1/mesh/cache/wrong-hit": _post("Report a wrong semantic-cache answer", WrongHitReport),
            "/v1/models": _get("The models this key can use"),
            "/v1/models/{model}": _get("One model", _id("model")),
            "/v1/files": {**_get("This tenant's files", [*_PAGE, {
                "name": "purpose", "in": "query", "required": False, "schema": {"type": "string"}}]),
                          "post": _UPLOAD},
            "/v1/files/{file_id}": {**_get("One file", _id("file_id")),
                                    **_get("Delete a file", _id("file_id"), method="delete")},
            "/v1/files/{file_id}/content": {"get": {
                **_get("A file's bytes", _id("file_id"))["get"],
                "responses": {"200": {"description": "the file", "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}}, **_failures()}}},
            "/v1/batches": {**_get("This tenant's batches, newest first", _PAGE),
                            **_post("Run a file's requests at batch priority", CreateBatchRequest)},
            "/v1/batches/{batch_id}": _get("One batch", _id("batch_id")),
            "/v1/batches/{batch_id}/cancel": _get("Cancel a batch", _id("batch_id"), method="post"),
        },
    }

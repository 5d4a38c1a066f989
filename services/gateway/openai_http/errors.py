"""The mesh's one error model (services/common/errors.py) in OpenAI's shape: a gRPC status becomes the HTTP
status OpenAI uses for the same situation, with `{"error": {"message", "type", "param", "code"}}`, so the openai
SDK raises its own exception class (BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...)
and retries what it should (429 with retry-after, 5xx)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services.common.errors import MeshError


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str


_BY_STATUS: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: HttpError(400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpError(400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: HttpError(404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: HttpError(409, "invalid_request_error", "already_exists"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "server_error", "timeout"),
}
_INTERNAL = HttpError(500, "server_error", "internal_error")
REQUEST_TOO_LARGE = HttpError(413, "invalid_request_error", "request_too_large")
NOT_A_ROUTE = HttpError(404, "invalid_request_error", "unknown_url")
WRONG_METHOD = HttpError(405, "invalid_request_error", "method_not_allowed")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; `headers` go with it (retry-after on 429)."""

    def __init__(self, kind: HttpError, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind.type, "param": self.param,
                          "code": self.kind.code}}


def from_mesh_error(exc: MeshError) -> OpenAIError:
    kind = _BY_STATUS.get(exc.code, _INTERNAL)
    # Trailing metadata the mesh attaches for its callers (retry-after) are HTTP headers here.
    return OpenAIError(kind, exc.message, headers=dict(exc.trailing))


def invalid_body(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(_BY_STATUS[grpc.StatusCode.INVALID_ARGUMENT], message, param)

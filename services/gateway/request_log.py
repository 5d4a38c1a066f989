"""One JSON log line per generation (Generate, Ask): tenant, model, status, durations, cache status, usage and
where it ran (the trace id is added by the formatter). Prompt and completion text only when enabled, and then
redacted (emails, phone numbers, keys)."""

from __future__ import annotations

import logging
import time

from inference_mesh.v1 import mesh_pb2
from services.gateway.redaction import redact

log = logging.getLogger("services.gateway.requests")


class GenerationLog:
    def __init__(self, kind: str, tenant: str, model: str, include_text: bool) -> None:
        self._kind = kind
        self._started = time.perf_counter()
        self._include_text = include_text
        self._completion: list[str] = []
        self._first_token_ms: float | None = None
        self.fields: dict = {"tenant": tenant, "model": model, "status": "OK"}
        self.prompt = ""

    def seen(self, chunk: mesh_pb2.GenerateChunk) -> None:
        if self._first_token_ms is None and chunk.text:
            self._first_token_ms = round((time.perf_counter() - self._started) * 1000, 1)
        if self._include_text:
            self._completion.append(chunk.text)
        if chunk.finish_reason:
            meta = chunk.metadata
            self.fields.update(
                request_id=meta.request_id, cache=mesh_pb2.CacheStatus.Name(meta.cache_status),
                finish=mesh_pb2.FinishReason.Name(chunk.finish_reason), prompt_tokens=chunk.usage.prompt_tokens,
                completion_tokens=chunk.usage.completion_tokens, pool=meta.pool, replica=meta.replica)
            for name in ("fallback", "retries", "resumed"):
                if getattr(meta, name):
                    self.fields[name] = getattr(meta, name)

    def failed(self, error: Exception) -> None:
        self.fields["status"] = getattr(getattr(error, "code", None), "name", type(error).__name__)

    def write(self) -> None:
        self.fields["duration_ms"] = round((time.perf_counter() - self._started) * 1000, 1)
        if self._first_token_ms is not None:
            self.fields["ttft_ms"] = self._first_token_ms
        if self._include_text:
            self.fields["prompt"] = redact(self.prompt)
            self.fields["completion"] = redact("".join(self._completion))
        log.info(self._kind, extra=self.fields)


def prompt_text(request: mesh_pb2.GenerateRequest) -> str:
    return "\n".join(f"{mesh_pb2.Role.Name(m.role)}: {m.content}" for m in request.messages)

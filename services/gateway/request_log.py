"""One JSON log line per generation (Generate, Ask): tenant, model, status, durations, cache status, usage and
where it ran (the trace id is added by the formatter). Prompt and completion text only when enabled, and then
redacted (emails, phone numbers, keys). The same observations make the generation's usage record (the admin
database's reports), handed to the usage writer without waiting."""

from __future__ import annotations

import logging
import time

from inference_mesh.v1 import mesh_pb2, models_pb2
from services.admin.usage import UsageRecord, UsageWriter
from services.gateway.budgets import CACHE_HITS
from services.gateway.plan import Delivered
from services.gateway.redaction import redact

log = logging.getLogger("services.gateway.requests")



def cost_of(model: models_pb2.ModelInfo | None, pool: str, tokens: int, discount: float = 0.0) -> float:
    """The registry's price (cost_per_1k_tokens of the pool that served) of `tokens`, less `discount` (a share)."""
    if model is None:
        return 0.0
    price = next((p.cost_per_1k_tokens for p in model.placements if p.pool == pool), 0.0)
    return tokens * price / 1000.0 * (1.0 - discount)


class GenerationLog:
    def __init__(self, kind: str, tenant: str, model: str, include_text: bool, key_id: str = "",
                 usage: UsageWriter | None = None) -> None:
        self._kind = kind
        self._started = time.perf_counter()
        self._include_text = include_text
        self._completion: list[str] = []
        self._first_token_ms: float | None = None
        self.fields: dict = {"tenant": tenant, "model": model, "status": "OK"}
        self.prompt = ""
        self._key_id = key_id
        self._usage = usage
        # Set once the request is planned: the model's prices, the caller's discount at its priority, and the prompt
        # tokens a cancelled stream read.
        self.model_info: models_pb2.ModelInfo | None = None
        self.delivered: Delivered | None = None
        self.discount = 0.0
        self._produced = 0
        self._final: mesh_pb2.GenerateChunk | None = None

    def seen(self, chunk: mesh_pb2.GenerateChunk) -> None:
        # A delta may span tokens: its token_index says how many. The last chunk of a finished stream repeats the
        # last index with no text (its usage then counts).
        if chunk.text:
            self._produced = max(self._produced + 1, chunk.token_index + 1)
        if chunk.finish_reason:
            self._final = chunk
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

    def cancelled(self) -> None:
        self.fields["status"] = "CANCELLED"

    def write(self) -> None:
        self.fields["duration_ms"] = round((time.perf_counter() - self._started) * 1000, 1)
        if self._first_token_ms is not None:
            self.fields["ttft_ms"] = self._first_token_ms
        if self._include_text:
            self.fields["prompt"] = redact(self.prompt)
            self.fields["completion"] = redact("".join(self._completion))
        log.info(self._kind, extra=self.fields)
        if self._usage is not None:
            self._usage.record(self.usage_record())

    def usage_record(self) -> UsageRecord:
        """What the caller received: the final usage when the stream finished, else the prompt the model read and
        the tokens sent before the end. A cache hit used no model: its tokens are reported as saved, at no cost."""
        final = self._final
        meta = final.metadata if final is not None else None
        pool = meta.pool if meta is not None else ""
        hit = meta is not None and meta.cache_status in CACHE_HITS
        if final is not None:
            prompt, completion = final.usage.prompt_tokens, final.usage.completion_tokens
        else:
            prompt = self.delivered.prompt_tokens if self.delivered is not None and self._produced else 0
            completion = self._produced
        return UsageRecord(
            at=time.time(), tenant=self.fields["tenant"], key_id=self._key_id, kind=self._kind,
            model=meta.model if meta is not None and meta.model else self.fields["model"],
            version=meta.model_version if meta is not None else "", pool=pool,
            request_id=self.fields.get("request_id", ""), status=self.fields["status"],
            cache=mesh_pb2.CacheStatus.Name(meta.cache_status) if meta is not None else "",
            input_tokens=prompt, output_tokens=completion, cached_tokens=prompt + completion if hit else 0,
            latency_ms=self.fields["duration_ms"], ttft_ms=self._first_token_ms,
            cost_usd=0.0 if hit else cost_of(self.model_info, pool, prompt + completion, self.discount))


def prompt_text(request: mesh_pb2.GenerateRequest) -> str:
    return "\n".join(f"{mesh_pb2.Role.Name(m.role)}: {m.content}" for m in request.messages)

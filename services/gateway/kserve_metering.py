"""KServe calls metered like the mesh API's (services/gateway/core.py): a generation's worst case is reserved
before it reaches the router and settled with what the model reports; an embedding is charged its input.

The usage tensors are the meter: the gateway asks for them whatever the caller asked (a caller listing only
`text_output` used to run unmetered) and strips them from the answers when the caller did not ask."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import models_pb2
from services.admin.usage import UsageRecord, UsageWriter
from services.common.errors import is_plain_request_id
from services.common.model_catalog import ModelCatalog
from services.common.wire import SHARE_WEIGHT_HEADER, TENANT_HEADER
from services.gateway.auth import Caller
from services.gateway.budgets import TokenBudgets, input_tokens_of
from services.gateway.kserve_governance import token_counts
from services.gateway.plan import TEMPLATE_TOKENS, plan_request
from services.gateway.request_log import cost_of

# The mesh's LLM contract (triton_models/smollm2, the TensorRT-LLM BLS model): what it reads and what it counts.
USAGE_OUTPUTS = ("prompt_tokens", "completion_tokens")
_MAX_TOKENS_INPUT = "max_tokens"
# No tokenizer here: a prompt is at most a token per 3 bytes of its text inputs (plan.estimated_cost's rule).
_BYTES_PER_PROMPT_TOKEN = 3


def _text_bytes(request: service_pb2.ModelInferRequest) -> int:
    raw = request.raw_input_contents
    return sum(len(raw[i]) if i < len(raw) else sum(map(len, t.contents.bytes_contents))
               for i, t in enumerate(request.inputs) if t.datatype == "BYTES")


def _asked_max_tokens(request: service_pb2.ModelInferRequest) -> int | None:
    for index, tensor in enumerate(request.inputs):
        if tensor.name != _MAX_TOKENS_INPUT or tensor.datatype != "INT32":
            continue
        if index < len(request.raw_input_contents):
            values = np.frombuffer(request.raw_input_contents[index][:4], dtype="<i4")
            return int(values[0]) if values.size else None
        return tensor.contents.int_contents[0] if tensor.contents.int_contents else None
    return None


def worst_case(request: service_pb2.ModelInferRequest, model: models_pb2.ModelInfo) -> int:
    """Everything a generation may cost before it runs: its prompt and template, plus the most the model will
    write for it (what the caller asked, within the model's own bound)."""
    asked = _asked_max_tokens(request)
    limit = model.max_output_tokens
    answer = limit if asked is None or asked <= 0 else min(asked, limit) if limit else asked
    return _text_bytes(request) // _BYTES_PER_PROMPT_TOKEN + TEMPLATE_TOKENS + answer


def ask_for_usage(request: service_pb2.ModelInferRequest) -> frozenset[str]:
    """Adds the usage outputs to a request that lists its outputs (none listed: Triton returns them all); the
    names added, to strip from its answers."""
    if not request.outputs:
        return frozenset()
    asked = {output.name for output in request.outputs}
    added = [name for name in USAGE_OUTPUTS if name not in asked]
    for name in added:
        request.outputs.add(name=name)
    return frozenset(added)


def strip_outputs(response: service_pb2.ModelInferResponse, names: frozenset[str]) -> None:
    if not names or not any(output.name in names for output in response.outputs):
        return
    raw = list(response.raw_output_contents)
    kept = [(output, raw[i] if i < len(raw) else None) for i, output in enumerate(response.outputs)
            if output.name not in names]
    del response.outputs[:]
    del response.raw_output_contents[:]
    response.outputs.extend(output for output, _ in kept)
    if raw:
        response.raw_output_contents.extend(content or b"" for _, content in kept)


@dataclass
class MeteredCall:
    """One KServe request's account: held before it runs, settled once with what it used, and recorded."""

    caller: Caller
    reservation: str = ""
    generation: bool = False
    # Charged when the model reports nothing (an embedding; a generation that never answered reads 0).
    unreported: int = 0
    strip: frozenset[str] = field(default_factory=frozenset)
    used: int | None = None
    settled: bool = False
    # The plan's headers for the router (tenant, weight, request id, priority, this call's cost), when the
    # registry knows the model; else the caller's tenant and weight only.
    headers: tuple[tuple[str, str], ...] = ()
    # For the usage record: the model as named and as the registry knows it, what the last response reported.
    model_name: str = ""
    model: models_pb2.ModelInfo | None = None
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pool: str = ""
    version: str = ""
    status: str = "OK"
    recorded: bool = False

    def answered(self, response: service_pb2.ModelInferResponse) -> None:
        """Reads the usage (cumulative over a stream's responses) and hides what the caller did not ask for."""
        parameters = response.parameters
        if "mesh_pool" in parameters:  # the router stamps the last response with where it ran
            self.pool = parameters["mesh_pool"].string_param
            self.version = parameters["mesh_model_version"].string_param
        if self.generation:
            counts = token_counts(response)
            if counts is not None:
                self.prompt_tokens, self.completion_tokens = counts
                self.used = sum(counts)
            strip_outputs(response, self.strip)

    def failed(self, status: str = "FAILED") -> None:
        """A call that failed before the model reported anything used nothing (a generation that failed midway
        keeps what it had produced)."""
        if self.status == "OK":
            self.status = status
        if self.used is None:
            self.used = 0

    def settle(self, budgets: TokenBudgets | None) -> None:
        if budgets is None or self.settled:
            return
        self.settled = True
        budgets.settle(self.caller, self.reservation, self.unreported if self.used is None else self.used)

    def usage_record(self) -> UsageRecord:
        """A generation's reported prompt and completion; an embedding's input as its budget counts it."""
        if self.generation:
            prompt, completion = self.prompt_tokens, self.completion_tokens
        else:
            prompt, completion = (self.unreported if self.status == "OK" else 0), 0
        name = self.model.name if self.model is not None else self.model_name
        return UsageRecord(
            at=time.time(), tenant=self.caller.tenant, key_id=self.caller.key_id,
            kind="kserve" if self.generation else "kserve-embed", model=name, version=self.version, pool=self.pool,
            request_id="", status=self.status, cache="", input_tokens=prompt, output_tokens=completion,
            cached_tokens=0, latency_ms=round((time.perf_counter() - self.started) * 1000, 1), ttft_ms=None,
            cost_usd=cost_of(self.model, self.pool, prompt + completion))


def caller_headers(caller: Caller) -> tuple[tuple[str, str], ...]:
    """What the router needs of a call it has no plan for: the tenant and its tier's weight for the fair queues
    (a raw KServe request's cost is unknown before it runs; the router charges its real use when it ends)."""
    return (TENANT_HEADER, caller.tenant), (SHARE_WEIGHT_HEADER, f"{caller.share_weight:g}")


class KServeMeter:
    def __init__(self, budgets: TokenBudgets | None, catalog: ModelCatalog, reservation_ttl_s: float,
                 usage: UsageWriter | None = None) -> None:
        self._usage = usage
        self._budgets = budgets
        self._catalog = catalog
        self._ttl_s = reservation_ttl_s

    def _plan_headers(self, caller: Caller, model: models_pb2.ModelInfo, request: service_pb2.ModelInferRequest,
                      cost: int) -> tuple[tuple[str, str], ...]:
        """The mesh API's plan (services/gateway/plan.py): one request id and cost from here to Triton. A KServe
        id is the caller's free text: carried on only if it is a plain id, else the plan makes one."""
        request_id = request.id if is_plain_request_id(request.id) else ""
        return plan_request(caller, model, request_id, self._ttl_s, cost=cost).headers

    async def open(self, caller: Caller, request: service_pb2.ModelInferRequest) -> MeteredCall:
        """Raises RESOURCE_EXHAUSTED (with retry-after) when the tenant's budget cannot cover the call. A model
        the registry does not know is only checked (the router refuses it by name). A key limited to some models
        may call only those, known or not."""
        caller.may_use(request.model_name)
        model = await self._catalog.get(request.model_name)
        call = MeteredCall(caller, headers=caller_headers(caller), model_name=request.model_name, model=model)
        if model is not None and model.kind == models_pb2.MODEL_KIND_GENERATE:
            worst = worst_case(request, model)
            call.headers = self._plan_headers(caller, model, request, worst)
            call.generation = True
            call.strip = ask_for_usage(request)
            if self._budgets is not None:
                call.reservation = await self._budgets.reserve(caller, worst, self._ttl_s)
            return call
        if self._budgets is not None:
            await self._budgets.admit(caller)
        if model is not None and model.kind == models_pb2.MODEL_KIND_EMBED:
            call.unreported = input_tokens_of(_text_bytes(request))
            call.headers = self._plan_headers(caller, model, request, call.unreported)
        return call

    def settle(self, call: MeteredCall) -> None:
        call.settle(self._budgets)
        if self._usage is not None and not call.recorded:
            call.recorded = True
            self._usage.record(call.usage_record())

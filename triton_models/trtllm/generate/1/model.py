"""A TensorRT-LLM pool's public generation model: the mesh's contract (the inputs and outputs of
triton_models/smollm2, so gateway, router, cache and budgets see no difference between pools) served by streaming
from the `tensorrt_llm` engine model through BLS.

Python backend, decoupled, `max_batch_size: 0`, async execute (requests of one instance run concurrently while
they wait on the engine, which batches them in flight). Per request it:
- renders the chat template into token ids (each message's content tokenized as text, chat_tokenizer.py);
- streams from the engine (`streaming`, `exclude_input_in_output`), counting the tokens of the whole stream: the
  engine's `sequence_length` counts one response's tokens, and its end token never appears in the output;
- decodes incrementally (a character split over tokens waits for its last byte), cuts stop strings at text level
  with the mesh's stop matcher and then stops the engine request (`stop` input, same request id);
- reports finish reasons truthfully: "stop" (end token or stop string), "length" (max_tokens), "cancelled";
- sends FINAL on a data response; greedy is top-k 1 (the engine refuses temperature 0);
- resumes from `resume_tokens` for greedy requests; a sampled stream carries no `token_id`, which tells the
  router it cannot be resumed (the engine's sampler cannot be fast-forwarded to a position).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from chat_tokenizer import load as load_tokenizer  # beside this file; Triton puts the folder on sys.path
from contract import INVALID, parse_messages, parse_resume, parse_sampling
from engine_stream import DONE, EngineStream
from stop_matcher import StopMatcher


class EngineError(Exception):
    """The engine refused or failed a request; the text starts with a status when the mesh should see one."""


def _optional(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _one(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)  # [batch 1, 1]: the engine model has a batch dimension


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.tokenizer = load_tokenizer(params["tokenizer"])
        self.engine = params.get("engine_model", "tensorrt_llm")
        self.max_input_len = int(params["max_input_len"])
        self.max_output_tokens = int(params["max_output_tokens"])
        self.default_max_tokens = int(params.get("default_max_tokens", "128"))
        # A BLS response iterator blocks its thread until the engine answers: one waiting thread per stream the
        # engine may hold (in flight and queued), or streams would wait for a thread rather than for the engine.
        self.waiters = ThreadPoolExecutor(max_workers=int(params.get("max_streams", "64")),
                                          thread_name_prefix="engine-stream")

    async def execute(self, requests: list) -> None:
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    async def _serve(self, request) -> None:
        sender = request.get_response_sender()
        try:
            await self._generate(request, sender)
        except Exception as exc:  # one bad request must not take the model down
            text = str(exc)
            message = text if text.startswith(INVALID) or isinstance(exc, EngineError) else f"generation failed: {text}"
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _messages(self, request) -> list[dict]:
        return parse_messages(pb_utils.get_input_tensor_by_name(request, "messages").as_numpy().reshape(-1)[0])

    def _engine_request(self, request_id: str, ids: list[int], output_len: int, temperature: float, top_p: float,
                        seed: int | None) -> pb_utils.InferenceRequest:
        inputs = [
            pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("input_lengths", _one(len(ids), np.int32)),
            pb_utils.Tensor("request_output_len", _one(output_len, np.int32)),
            pb_utils.Tensor("end_id", _one(self.tokenizer.eos_id, np.int32)),
            pb_utils.Tensor("pad_id", _one(self.tokenizer.eos_id, np.int32)),
            pb_utils.Tensor("streaming", _one(True, np.bool_)),
            pb_utils.Tensor("exclude_input_in_output", _one(True, np.bool_)),
        ]
        if temperature == 0.0:
            inputs.append(pb_utils.Tensor("runtime_top_k", _one(1, np.int32)))  # greedy
        else:
            inputs += [pb_utils.Tensor("temperature", _one(temperature, np.float32)),
                       pb_utils.Tensor("runtime_top_p", _one(top_p, np.float32))]
        if seed is not None:
            inputs.append(pb_utils.Tensor("random_seed", _one(seed, np.uint64)))
        return pb_utils.InferenceRequest(model_name=self.engine, request_id=request_id, inputs=inputs,
                                         requested_output_names=["output_ids", "sequence_length"])

    async def _drain(self, responses) -> None:
        """Reads a stream to its end. python_backend r24.10 holds every unread response of a BLS stream (the final
        one in shared memory) until it is read, and the iterator's destructor blocks reading them: so the rest of
        a stream the mesh no longer needs is read here, in a waiter thread, never dropped."""
        await asyncio.get_running_loop().run_in_executor(self.waiters, _exhaust, responses)

    async def _stop_engine(self, request_id: str, stream: EngineStream) -> None:
        """TensorRT-LLM stops an in-flight request when a request with its id says `stop`; the stopped stream then
        ends with a final response, which is read (`EngineStream.finish`)."""
        stop = pb_utils.InferenceRequest(model_name=self.engine, request_id=request_id, inputs=[
            pb_utils.Tensor("input_ids", np.array([[self.tokenizer.eos_id]], dtype=np.int32)),
            pb_utils.Tensor("input_lengths", _one(1, np.int32)),
            pb_utils.Tensor("request_output_len", _one(1, np.int32)),
            pb_utils.Tensor("stop", _one(True, np.bool_)),
        ], requested_output_names=["output_ids"])
        with contextlib.suppress(Exception):  # the request may have ended on its own meanwhile
            await self._drain(await stop.async_exec(decoupled=True))
        await stream.finish()

    async def _generate(self, request, sender) -> None:
        sampling = parse_sampling(lambda name: _optional(request, name), self.default_max_tokens,
                                  self.max_output_tokens)
        max_tokens, temperature, top_p, seed = sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed
        prompt = self.tokenizer.chat_ids(self._messages(request))
        resume = parse_resume(lambda name: _optional(request, name), max_tokens, self.tokenizer.vocab_size)
        # The engine reads prompt and resumed tokens as one context: past max_input_len it fails the request.
        if len(prompt) + len(resume) > self.max_input_len:
            raise ValueError(f"{INVALID}prompt is {len(prompt)} tokens with {len(resume)} resumed; the engine "
                             f"takes {self.max_input_len} in all")
        # Sampled text cannot be continued exactly elsewhere: no token ids, so the router does not try.
        resumable = temperature == 0.0
        text_stream = self.tokenizer.text_stream()
        stop = StopMatcher(sampling.stops)
        for token in resume:  # the caller has this text; replay it so held-back bytes and stop prefixes match
            stop.feed(text_stream.push(token))
        produced = len(resume)
        finish = "length"
        if not stop.stopped and produced < max_tokens:
            finish, produced = await self._stream(request, sender, prompt, resume, max_tokens, temperature, top_p,
                                                  seed, text_stream, stop, resumable)
        elif stop.stopped:
            finish = "stop"
        tail = "" if stop.stopped or finish == "cancelled" else stop.flush()
        self._send(sender, tail, finish, len(prompt), produced, [] if resumable else None, final=True)

    async def _stream(self, request, sender, prompt: list[int], resume: list[int], max_tokens: int,
                      temperature: float, top_p: float, seed: int | None, text_stream, stop: StopMatcher,
                      resumable: bool) -> tuple[str, int]:
        """Streams the engine's tokens to the caller; every response that arrived while the last was being sent
        goes out as one delta (engine_stream.py)."""
        request_id = uuid.uuid4().hex
        engine = self._engine_request(request_id, prompt + resume, max_tokens - len(resume), temperature, top_p,
                                      seed)
        stream = EngineStream(iter(await engine.async_exec(decoupled=True)), asyncio.get_running_loop(),
                              self.waiters)
        produced = len(resume)
        try:
            while True:
                batch = await stream.ready()
                if request.is_cancelled():
                    await self._stop_engine(request_id, stream)
                    return "cancelled", produced
                text = ""
                sent: list[int] = []
                ended = failure = None
                for response in batch:
                    if response is DONE:
                        # The engine ended the request: at max tokens, else at its end token (never in the output).
                        ended = "length" if produced >= max_tokens else "stop"
                        break
                    if response.has_error():
                        failure = EngineError(_engine_status(response.error().message()))
                        break
                    output = pb_utils.get_output_tensor_by_name(response, "output_ids")
                    tokens = [int(t) for t in output.as_numpy().reshape(-1) if t >= 0] if output is not None else []
                    for token in tokens:
                        if token == self.tokenizer.eos_id:
                            continue
                        produced += 1
                        sent.append(token)
                        text += stop.feed(text_stream.push(token))
                        if stop.stopped or produced >= max_tokens:
                            break
                    if stop.stopped or produced >= max_tokens:
                        break
                if sent:
                    self._send(sender, text, "", len(prompt), produced, sent if resumable else None)
                if failure is not None:
                    raise failure
                if ended is not None:
                    return ended, produced
                if stop.stopped:
                    await self._stop_engine(request_id, stream)
                    return "stop", produced
                if produced >= max_tokens:
                    # The engine was asked for exactly these tokens and ends the request itself: no stop to send.
                    return "length", produced
        finally:
            await stream.finish()  # a no-op wait when the stream was already read to its end

    def finalize(self) -> None:
        self.waiters.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _send(sender, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
              tokens: list[int] | None, final: bool = False) -> None:
        outputs = [
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32)),
        ]
        if tokens is not None:
            outputs.append(pb_utils.Tensor("token_id", np.array(tokens, dtype=np.int32)))
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)


def _exhaust(responses) -> None:
    collections.deque(responses, maxlen=0)


def _engine_status(message: str) -> str:
    """The engine's refusal with the status the mesh should answer: a full queue is the caller's cue to back off."""
    lowered = message.lower()
    if "queue" in lowered and ("full" in lowered or "exceed" in lowered or "queue size" in lowered):
        return f"RESOURCE_EXHAUSTED: engine queue full: {message}"
    return f"INTERNAL: engine: {message}"

"""Chat messages → token ids and TensorRT-LLM's sampling inputs, for the mesh's generation contract.

Runs in the tritonserver TensorRT-LLM image (transformers is there); the tokenizer and its chat template come
from the engine's checkpoint folder (`tokenizer_dir`), so nothing is fetched at run time.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

INVALID = "INVALID_ARGUMENT: "
ROLES = {"system", "user", "assistant"}


def _first(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"], local_files_only=True)
        self.max_input_len = int(params["max_input_len"])
        self.default_max_tokens = int(params["default_max_tokens"])
        self.max_output_tokens = int(params["max_output_tokens"])
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            return pb_utils.InferenceResponse(output_tensors=self._tensors(request))
        except ValueError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))

    def _messages(self, request) -> list[dict]:
        raw = _first(request, "messages", b"")
        try:
            messages = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{INVALID}messages must be UTF-8 JSON: {exc}") from exc
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"{INVALID}messages must be a non-empty list of {{role, content}}")
        return messages

    def _stop_words(self, request) -> np.ndarray:
        """TensorRT-LLM's [2, n] layout: the stop sequences' ids concatenated, then their end offsets."""
        tensor = pb_utils.get_input_tensor_by_name(request, "stop")
        stops = [] if tensor is None else [s.decode() if isinstance(s, bytes) else str(s)
                                           for s in tensor.as_numpy().reshape(-1) if s]
        ids, offsets = [], []
        for stop in stops:
            ids += self.tokenizer.encode(stop, add_special_tokens=False)
            offsets.append(len(ids))
        width = max(1, len(ids))
        words = np.full((1, 2, width), -1, dtype=np.int32)  # leading batch dimension of one request
        words[0, 0, :len(ids)] = ids
        words[0, 1, :len(offsets)] = offsets
        return words

    def _tensors(self, request) -> list:
        prompt = self.tokenizer.apply_chat_template(self._messages(request), tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = int(_first(request, "max_tokens", self.default_max_tokens))
        temperature = float(_first(request, "temperature", 0.7))
        top_p = float(_first(request, "top_p", 0.95))
        if not 1 <= max_tokens <= self.max_output_tokens:
            raise ValueError(f"{INVALID}max_tokens must be within 1..{self.max_output_tokens}, got {max_tokens}")
        if len(ids) > self.max_input_len:
            raise ValueError(f"{INVALID}prompt is {len(ids)} tokens; the engine takes {self.max_input_len}")
        if not (0.0 <= temperature <= 2.0 and 0.0 < top_p <= 1.0):
            raise ValueError(f"{INVALID}temperature must be in [0, 2] and top_p in (0, 1]")
        seed = int(_first(request, "seed", np.random.randint(0, 2**31))) & 0x7FFFFFFFFFFFFFFF
        # Greedy: TensorRT-LLM samples greedily with top-k 1; temperature 0 itself is not accepted.
        one = lambda value, dtype: np.array([[value]], dtype=dtype)  # noqa: E731 - [batch, 1]
        return [
            pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("input_lengths", one(len(ids), np.int32)),
            pb_utils.Tensor("request_output_len", one(max_tokens, np.int32)),
            pb_utils.Tensor("end_id", one(self.end_id, np.int32)),
            pb_utils.Tensor("pad_id", one(self.pad_id, np.int32)),
            pb_utils.Tensor("runtime_temperature", one(max(temperature, 1e-5), np.float32)),
            pb_utils.Tensor("runtime_top_p", one(top_p if temperature > 0 else 1e-5, np.float32)),
            pb_utils.Tensor("random_seed", one(seed, np.uint64)),
            pb_utils.Tensor("stop_words_list", self._stop_words(request)),
            pb_utils.Tensor("streaming", one(True, np.bool_)),
        ]

"""Each streamed TensorRT-LLM response (its new token ids) → the mesh's outputs: text_output, token_id,
prompt_tokens, completion_tokens and finish_reason ("stop" at the end token, "length" at max_tokens, else "").

Responses are independent requests to this model, so a character split over two tokens is decoded with the
replacement character; the CPU model (triton_models/smollm2) keeps a decoder across its stream instead.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _array(request, name: str) -> np.ndarray:
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"], local_files_only=True)

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request):
        # [batch=1, beam=1, tokens]: with exclude_input_in_output and streaming, the tokens new in this response.
        new_ids = [int(t) for t in _array(request, "output_ids").reshape(-1) if t >= 0]
        produced = int(_array(request, "sequence_length").reshape(-1)[0])
        prompt = int(_array(request, "input_lengths").reshape(-1)[0])
        limit = int(_array(request, "request_output_len").reshape(-1)[0])
        end_id = int(_array(request, "end_id").reshape(-1)[0])
        visible = [t for t in new_ids if t != end_id]
        finish = "stop" if end_id in new_ids else "length" if produced >= limit else ""
        text = self.tokenizer.decode(visible, skip_special_tokens=True)
        row = lambda value, dtype: np.array([[value]], dtype=dtype)  # noqa: E731 - [batch, 1]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", row(text.encode("utf-8"), np.object_)),
            pb_utils.Tensor("finish_reason", row(finish.encode(), np.object_)),
            pb_utils.Tensor("prompt_tokens", row(prompt, np.int32)),
            pb_utils.Tensor("completion_tokens", row(produced, np.int32)),
            pb_utils.Tensor("token_id", np.array([visible], dtype=np.int32)),
        ])

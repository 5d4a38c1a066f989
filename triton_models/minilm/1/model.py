"""Triton python-backend model: sentence embeddings with onnxruntime, one session run per dynamic batch."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

HERE = pathlib.Path(__file__).parent


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        onnx_path = HERE / "model.onnx"
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"{onnx_path} is missing: run `make models` to export it")
        options = ort.SessionOptions()
        # The launcher splits a shared host's cores between replicas (tools/triton.py).
        options.intra_op_num_threads = int(os.environ.get("MESH_MODEL_CPU_THREADS") or
                                           params.get("intra_op_threads", "0"))
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=int(params.get("max_sequence_tokens", "256")))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def execute(self, requests: list) -> list:
        texts: list[str] = []
        counts: list[int] = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts.extend(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)
            counts.append(len(values))
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        vectors = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
        responses = []
        start = 0
        for count in counts:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("EMBEDDING", vectors[start : start + count])]))
            start += count
        return responses

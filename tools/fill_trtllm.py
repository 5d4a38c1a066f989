"""Fills the TensorRT-LLM model templates (triton_models/trtllm/) for one GPU pool from config/trtllm_pools.yaml.

`python -m tools.fill_trtllm --out DIR` writes DIR/<pool>/ (a model repository) and DIR/<pool>.env (the pool's
trtllm-build settings for compose/trtllm/build_engine.sh) for every pool; compose runs it into a volume before
the pools' Tritons start. The tests fill every pool and parse each config against Triton's model config proto.
"""

from __future__ import annotations

import argparse
import shutil
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "triton_models" / "trtllm"
POOLS_FILE = ROOT / "config" / "trtllm_pools.yaml"
OUT = ROOT / "build" / "trtllm"
ENGINES = "/engines"
MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")


class ModelSource(BaseModel, extra="forbid"):
    triton_name: str
    hf_checkpoint: str
    convert_script: str


class PoolProfile(BaseModel, extra="forbid"):
    dtype: Literal["bfloat16", "float16", "float32"]
    weight_only_precision: Literal["", "int8", "int4"] = ""
    max_batch_size: int = Field(ge=1)
    max_input_len: int = Field(ge=1)
    max_seq_len: int
    max_num_tokens: int
    kv_cache_free_gpu_mem_fraction: float = Field(gt=0, le=1)
    max_queue_delay_microseconds: int = Field(ge=0)
    batch_scheduler_policy: Literal["max_utilization", "guaranteed_no_evict"]
    preprocessing_instances: int = Field(ge=1)
    postprocessing_instances: int = Field(ge=1)

    @model_validator(mode="after")
    def _room_for_output(self) -> PoolProfile:
        if self.max_seq_len <= self.max_input_len:
            raise ValueError("max_seq_len must exceed max_input_len (the rest is room for output)")
        return self


class TrtllmPools(BaseModel, extra="forbid"):
    model: ModelSource
    pools: dict[str, PoolProfile]

    @classmethod
    def load(cls, path: Path = POOLS_FILE) -> TrtllmPools:
        return cls.model_validate(yaml.safe_load(path.read_text()))


def values(pools: TrtllmPools, pool: str) -> dict[str, str]:
    profile = pools.pools[pool]
    return {
        "model_name": pools.model.triton_name,
        "triton_max_batch_size": str(profile.max_batch_size),
        "max_queue_delay_microseconds": str(profile.max_queue_delay_microseconds),
        "engine_dir": f"{ENGINES}/{pool}",
        "tokenizer_dir": pools.model.hf_checkpoint,
        "max_input_len": str(profile.max_input_len),
        "max_output_len": str(profile.max_seq_len - profile.max_input_len),
        "kv_cache_free_gpu_mem_fraction": str(profile.kv_cache_free_gpu_mem_fraction),
        "batch_scheduler_policy": profile.batch_scheduler_policy,
        "preprocessing_instances": str(profile.preprocessing_instances),
        "postprocessing_instances": str(profile.postprocessing_instances),
    }


def rendered(pools: TrtllmPools, pool: str) -> dict[str, str]:
    """Relative path → text of one pool's model repository (the ensemble under the model's Triton name)."""
    fill = values(pools, pool)
    files: dict[str, str] = {}
    for model in MODELS:
        name = pools.model.triton_name if model == "ensemble" else model
        template = string.Template((TEMPLATES / model / "config.pbtxt.tmpl").read_text())
        files[f"{name}/config.pbtxt"] = template.substitute(fill)  # a missing value raises, never half-filled
        source = TEMPLATES / model / "1" / "model.py"
        files[f"{name}/1/{'model.py' if source.exists() else '.keep'}"] = source.read_text() if source.exists() else ""
    return files


def build_args(pools: TrtllmPools, pool: str) -> str:
    """Shell assignments for compose/trtllm/build_engine.sh."""
    profile = pools.pools[pool]
    settings = {"HF_CHECKPOINT": pools.model.hf_checkpoint, "CONVERT_SCRIPT": pools.model.convert_script,
                "DTYPE": profile.dtype, "WEIGHT_ONLY": profile.weight_only_precision,
                "MAX_BATCH_SIZE": profile.max_batch_size, "MAX_INPUT_LEN": profile.max_input_len,
                "MAX_SEQ_LEN": profile.max_seq_len, "MAX_NUM_TOKENS": profile.max_num_tokens,
                "ENGINE_DIR": f"{ENGINES}/{pool}"}
    return "\n".join(f"{key}='{value}'" for key, value in settings.items())


def write(out: Path = OUT) -> None:
    pools = TrtllmPools.load()
    for pool in pools.pools:
        target = out / pool
        shutil.rmtree(target, ignore_errors=True)
        for relative, text in rendered(pools, pool).items():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).write_text(text)
        (target.parent / f"{pool}.env").write_text(build_args(pools, pool) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    write(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

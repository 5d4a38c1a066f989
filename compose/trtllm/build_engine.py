"""Builds one pool's TensorRT-LLM engine into the engines volume, with the TensorRT-LLM Python API of the wheel
inside the pinned image (nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3, TensorRT-LLM 0.14). That image has
no `examples/` folder, so the checkpoint is converted in process (`<Architecture>.from_hugging_face`) instead of
by the examples' convert_checkpoint.py.

Run by the compose service engine-builder-<pool> on that pool's GPU: `python3 /build/build_engine.py <pool>`.
Settings: /trtllm-models/<pool>.json, written by tools/fill_trtllm.py from config/trtllm_pools.yaml. The engine
is rebuilt when those settings change (their digest is stored beside it) and refused on a GPU whose compute
capability is not the pool's (an engine only runs on the architecture it was built for). Every missing part
ends the build with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

STAMP = "mesh-build-settings.sha256"


def fail(message: str) -> None:
    print(f"engine build: {message}", file=sys.stderr)
    sys.exit(1)


def settings_of(pool: str) -> tuple[dict, str]:
    path = Path("/trtllm-models") / f"{pool}.json"
    if not path.is_file():
        fail(f"{path} is missing: the trtllm-models service (tools/fill_trtllm.py) writes it first")
    text = path.read_text()
    return json.loads(text), hashlib.sha256(text.encode()).hexdigest()


def gpu_capability() -> str:
    try:
        import torch
    except ImportError:
        fail("torch is not importable: run this in the TensorRT-LLM Triton image")
    if not torch.cuda.is_available():
        fail("no CUDA device visible: give the container the pool's GPU (deploy.resources.reservations.devices) "
             "and install the NVIDIA container toolkit on the host")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def build(settings: dict, target: Path) -> None:
    try:
        import tensorrt_llm
        from tensorrt_llm import BuildConfig
        from tensorrt_llm import build as build_engine
        from tensorrt_llm.bindings import KVCacheType
        from tensorrt_llm.models import MODEL_MAP
        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization import QuantAlgo
    except ImportError as exc:
        fail(f"the TensorRT-LLM wheel is not importable ({exc}): use the 24.10-trtllm-python-py3 image")
    print(f"TensorRT-LLM {tensorrt_llm.__version__}", flush=True)
    checkpoint = Path(settings["hf_checkpoint"])
    if not (checkpoint / "config.json").is_file():
        fail(f"no Hugging Face checkpoint at {checkpoint}: put the model there (MESH_HF_MODELS in compose/.env)")
    model_class = MODEL_MAP.get(settings["architecture"])
    if model_class is None:
        fail(f"TensorRT-LLM has no model class {settings['architecture']!r}; known: {sorted(MODEL_MAP)}")
    quant = QuantConfig()
    if settings["weight_only_precision"]:
        quant.quant_algo = {"int8": QuantAlgo.W8A16, "int4": QuantAlgo.W4A16}[settings["weight_only_precision"]]
    model = model_class.from_hugging_face(str(checkpoint), dtype=settings["dtype"], quant_config=quant)
    config = BuildConfig(max_batch_size=settings["max_batch_size"], max_input_len=settings["max_input_len"],
                         max_seq_len=settings["max_seq_len"], max_num_tokens=settings["max_num_tokens"],
                         max_beam_width=1)
    config.kv_cache_type = KVCacheType.PAGED  # what the old `--paged_kv_cache enable` flag became
    plugins = config.plugin_config
    plugins.gemm_plugin = "auto"
    plugins.gpt_attention_plugin = "auto"
    plugins.remove_input_padding = True
    # Turing (sm75) has no paged-context FMHA kernels; KV reuse and chunked context need them (the pool's profile
    # says so, and tools/fill_trtllm.py refuses the combination).
    plugins.use_paged_context_fmha = bool(settings["paged_context_fmha"])
    engine = build_engine(model, config)
    engine.save(str(target))


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: build_engine.py <pool>")
    pool = sys.argv[1]
    settings, digest = settings_of(pool)
    target = Path(settings["engine_dir"])
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest and any(target.glob("rank0.engine")):
        print(f"engine for {pool} already in {target}, built with these settings")
        return
    capability = gpu_capability()
    if capability != settings["compute_capability"]:
        fail(f"pool {pool} expects compute capability {settings['compute_capability']}, this GPU has {capability}: "
             f"check the device id given to engine-builder-{pool} and triton-{pool} in compose/.env")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(settings, partial)
    (partial / STAMP).write_text(digest + "\n")
    # Only a finished build becomes the engine: an interrupted one is rebuilt on the next start.
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    print(f"built {target}")


if __name__ == "__main__":
    main()

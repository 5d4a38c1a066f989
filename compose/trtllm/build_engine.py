"""Builds one pool's TensorRT-LLM engine, once per (checkpoint, build settings, TensorRT-LLM version, GPU class),
and points the pool's model repository at it. Runs inside the pinned image
(nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3, TensorRT-LLM 0.14, Python 3.10), on the GPU that will serve
the engine: in compose as the engine-builder-<pool> service before triton-<pool>; in the Helm chart as an init
container of each Triton pod, so the build never competes with serving pods for GPUs and Triton starts only once
its engine exists.

`python3 build_engine.py <pool>` reads /trtllm-models/<pool>.json (tools/fill_trtllm.py writes it) and:
- takes the model class from the checkpoint's own config.json (`architectures[0]`, the Hugging Face name that
  TensorRT-LLM's MODEL_MAP is keyed by), so a new Llama-family checkpoint needs no code;
- writes the engine to /engines/<pool>/<key>, the key a digest of the checkpoint, the settings that shape the
  engine, the TensorRT-LLM and TensorRT versions and the GPU (name and compute capability): an image bump, another
  GPU or another checkpoint gets a new engine instead of loading an incompatible one;
- gives a checkpoint with tied embeddings (no lm_head.weight) an explicit lm_head, which TensorRT-LLM 0.14's
  loader otherwise reads as None;
- lets one builder build while others sharing the volume wait (a lock directory, taken over when stale);
- rewrites the repository's `gpt_model_path` to that engine.
Every name it uses from TensorRT-LLM is checked before the build starts (and against the pinned upstream source by
tests/unit/tools/test_upstream_facts.py), so a mismatch fails with a message, not half-way through a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

ENGINE_RECORD = "mesh-engine.json"
ENGINE_FILE = "rank0.engine"
# What fill_trtllm writes as the engine path until a build points the repository at a real engine: a Triton
# started without its builder fails to load with this name in the message.
UNBUILT = "unbuilt-run-build_engine.py"
# The settings that change the engine itself; runtime settings (KV-cache fraction, queue sizes) do not rebuild.
ENGINE_SHAPING = ("dtype", "weight_only_precision", "max_batch_size", "max_input_len", "max_seq_len",
                  "max_num_tokens", "paged_context_fmha")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
FINGERPRINT_BYTES = 1 << 20
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def fail(message: str) -> NoReturn:
    print(f"engine build: {message}", file=sys.stderr)
    sys.exit(1)


def architecture_of(checkpoint: Path) -> str:
    config = checkpoint / "config.json"
    if not config.is_file():
        fail(f"no Hugging Face checkpoint at {checkpoint} (config.json missing): put the model there "
             "(MESH_HF_MODELS in compose/.env; the chart's models.checkpointUri)")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if not architectures:
        fail(f"{config} names no architectures: it is not a causal-LM checkpoint TensorRT-LLM can convert")
    return architectures[0]


def model_class(model_map: dict, architecture: str):
    """TensorRT-LLM's class for a Hugging Face architecture name (MODEL_MAP is keyed by those names)."""
    if architecture not in model_map:
        fail(f"TensorRT-LLM has no model class for {architecture!r} (the checkpoint's config.json); "
             f"it converts: {', '.join(sorted(model_map))}")
    return model_map[architecture]


def weight_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """config.json and every weight file's name, size, first and last MiB: another checkpoint or a re-download
    of other weights changes it, without reading tens of GB on every start."""
    digest = hashlib.sha256((checkpoint / "config.json").read_bytes())
    for path in weight_files(checkpoint):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as weights:
            digest.update(weights.read(FINGERPRINT_BYTES))
            weights.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(weights.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def engine_key(fingerprint: str, settings: dict, versions: dict[str, str], gpu: dict[str, str]) -> str:
    shaping = {name: settings[name] for name in ENGINE_SHAPING}
    identity = {"checkpoint": fingerprint, "build": shaping, "versions": versions, "gpu": gpu}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def tensor_names(checkpoint: Path) -> set[str]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: set[str] = set()
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as weights:
            names |= set(weights.keys())
    return names


def untied_checkpoint(checkpoint: Path, scratch: Path) -> Path:
    """The checkpoint itself, or, when its embeddings are tied and it has no lm_head.weight, a copy (links to the
    original files) with lm_head.weight = the embedding table: TensorRT-LLM 0.14 loads lm_head by name."""
    config = json.loads((checkpoint / "config.json").read_text())
    if not config.get("tie_word_embeddings", False):
        return checkpoint
    names = tensor_names(checkpoint)
    if LM_HEAD in names:
        return checkpoint
    if EMBEDDING not in names:
        fail(f"{checkpoint} ties its embeddings but has neither {LM_HEAD} nor {EMBEDDING}")
    from safetensors import safe_open
    from safetensors.numpy import save_file

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.name != "model.safetensors.index.json":
            (scratch / path.name).symlink_to(path.resolve())
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    source = index["weight_map"][EMBEDDING] if index else next(p.name for p in checkpoint.glob("*.safetensors"))
    with safe_open(str(checkpoint / source), framework="numpy") as weights:
        embedding = weights.get_tensor(EMBEDDING)
    if index is None:
        # A single-file checkpoint stays single-file (loaders look for model.safetensors): rewritten with lm_head.
        (scratch / source).unlink()
        with safe_open(str(checkpoint / source), framework="numpy") as weights:
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 - safe_open is no mapping
        save_file({**tensors, LM_HEAD: embedding.copy()}, str(scratch / source), metadata={"format": "pt"})
    else:
        save_file({LM_HEAD: embedding.copy()}, str(scratch / "mesh-lm-head.safetensors"), metadata={"format": "pt"})
        index["weight_map"][LM_HEAD] = "mesh-lm-head.safetensors"
        (scratch / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config["tie_word_embeddings"] = False
    (scratch / "config.json").unlink()
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    return scratch


_MODEL_PATH = re.compile(r'(key:\s*"gpt_model_path"\s*value:\s*\{\s*string_value:\s*")([^"]*)(")')


def point_repository(engine_config: Path, engine_dir: Path) -> None:
    """The repository's tensorrt_llm model loads this engine (the repository is the pod's or the pool's own)."""
    text = engine_config.read_text()
    if not _MODEL_PATH.search(text):
        fail(f"{engine_config} has no gpt_model_path parameter to point at the engine")
    engine_config.write_text(_MODEL_PATH.sub(lambda m: f"{m[1]}{engine_dir}{m[3]}", text))


def is_built(engine_dir: Path) -> bool:
    return (engine_dir / ENGINE_RECORD).is_file() and (engine_dir / ENGINE_FILE).is_file()


def claim(lock: Path, stale_after_s: float) -> bool:
    """mkdir is atomic on local and network volumes: whoever creates the lock builds. A lock older than a build
    can take (its builder died) is taken over."""
    try:
        lock.mkdir()
        (lock / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    except FileExistsError:
        if time.time() - lock.stat().st_mtime > stale_after_s:
            shutil.rmtree(lock, ignore_errors=True)
            return claim(lock, stale_after_s)
        return False


def wait_for(engine_dir: Path, lock: Path, stale_after_s: float, poll_s: float = 10.0) -> bool:
    """Another builder holds the lock: wait for its engine; False if its lock went away without one."""
    while lock.exists():
        if is_built(engine_dir):
            return True
        owner = (lock / "owner").read_text().strip() if (lock / "owner").is_file() else "?"
        print(f"engine {engine_dir.name} is being built by {owner}; waiting", flush=True)
        time.sleep(poll_s)
        if lock.exists() and time.time() - lock.stat().st_mtime > stale_after_s:
            return False
    return is_built(engine_dir)


def gpu_identity(expected_capability: str) -> dict[str, str]:
    try:
        import torch
    except ImportError:
        fail("torch is not importable: run this in the TensorRT-LLM Triton image")
    if not torch.cuda.is_available():
        fail("no CUDA device visible: give the builder the pool's GPU (compose: deploy.resources.reservations."
             "devices; Kubernetes: nvidia.com/gpu) and install the NVIDIA container toolkit on the host")
    major, minor = torch.cuda.get_device_capability(0)
    capability = f"{major}.{minor}"
    if capability != expected_capability:
        fail(f"the pool expects compute capability {expected_capability}, this GPU has {capability}: an engine "
             "runs only on the architecture it was built for; check the GPU given to the pool")
    return {"name": torch.cuda.get_device_name(0), "capability": capability}


def checked(obj, names: tuple[str, ...], what: str) -> None:
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        fail(f"this TensorRT-LLM has no {what} {missing}: the builder was written against 0.14 (the image "
             "nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3); use that image or update build_engine.py")


BUILD_CONFIG_FIELDS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width",
                       "kv_cache_type", "plugin_config", "output_timing_cache")
PLUGIN_FIELDS = ("gemm_plugin", "gpt_attention_plugin", "remove_input_padding", "use_paged_context_fmha")


def build(settings: dict, architecture: str, checkpoint: Path, target: Path) -> None:
    from tensorrt_llm import BuildConfig
    from tensorrt_llm import build as build_engine
    from tensorrt_llm.bindings import KVCacheType
    from tensorrt_llm.models import MODEL_MAP
    from tensorrt_llm.models.modeling_utils import QuantConfig
    from tensorrt_llm.quantization import QuantAlgo

    cls = model_class(MODEL_MAP, architecture)
    config = BuildConfig()
    checked(config, BUILD_CONFIG_FIELDS, "BuildConfig field")
    checked(config.plugin_config, PLUGIN_FIELDS, "plugin setting")
    checked(KVCacheType, ("PAGED",), "KVCacheType")
    checked(QuantAlgo, ("W8A16", "W4A16"), "QuantAlgo")
    quant = QuantConfig()
    if settings["weight_only_precision"]:
        quant.quant_algo = {"int8": QuantAlgo.W8A16, "int4": QuantAlgo.W4A16}[settings["weight_only_precision"]]
    model = cls.from_hugging_face(str(checkpoint), dtype=settings["dtype"], quant_config=quant)
    config.max_batch_size = settings["max_batch_size"]
    config.max_input_len = settings["max_input_len"]
    config.max_seq_len = settings["max_seq_len"]
    config.max_num_tokens = settings["max_num_tokens"]
    config.max_beam_width = 1
    config.kv_cache_type = KVCacheType.PAGED  # what the old `--paged_kv_cache enable` flag became
    # Its default is model.cache in the working directory, which is read-only in the chart's pods.
    config.output_timing_cache = "/tmp/mesh-engine-timing.cache"
    plugins = config.plugin_config
    plugins.gemm_plugin = "auto"
    plugins.gpt_attention_plugin = "auto"
    plugins.remove_input_padding = True
    # Turing (sm75) has no paged-context FMHA kernels; KV reuse and chunked context need them (the pool's profile
    # says so, and tools/fill_trtllm.py refuses the combination).
    plugins.use_paged_context_fmha = bool(settings["paged_context_fmha"])
    build_engine(model, config).save(str(target))


def versions() -> dict[str, str]:
    try:
        import tensorrt
        import tensorrt_llm
    except ImportError as exc:
        fail(f"TensorRT-LLM is not importable ({exc}): run this in the 24.10-trtllm-python-py3 image")
    return {"tensorrt_llm": tensorrt_llm.__version__, "tensorrt": tensorrt.__version__}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        fail("usage: build_engine.py <pool>")
    pool = argv[1]
    repository = Path(os.environ.get("MESH_TRTLLM_MODELS", "/trtllm-models"))
    settings_path = repository / f"{pool}.json"
    if not settings_path.is_file():
        fail(f"{settings_path} is missing: tools/fill_trtllm.py writes it first (the trtllm-models service in "
             "compose, the fill-repository init container in the chart)")
    settings = json.loads(settings_path.read_text())
    checkpoint = Path(settings["hf_checkpoint"])
    architecture = architecture_of(checkpoint)
    identity_versions = versions()
    gpu = gpu_identity(settings["compute_capability"])
    key = engine_key(checkpoint_fingerprint(checkpoint), settings, identity_versions, gpu)
    engines = Path(settings["engines_root"])
    engines.mkdir(parents=True, exist_ok=True)
    engine_dir = engines / key
    stale_after_s = float(settings["build_timeout_s"])
    lock = engines / f"{key}.lock"
    while not is_built(engine_dir):
        if not claim(lock, stale_after_s):
            wait_for(engine_dir, lock, stale_after_s)
            continue
        try:
            partial = engines / f"{key}.partial-{socket.gethostname()}"
            shutil.rmtree(partial, ignore_errors=True)
            print(f"building {architecture} for {pool} ({gpu['name']}, TensorRT-LLM "
                  f"{identity_versions['tensorrt_llm']}) into {engine_dir}", flush=True)
            build(settings, architecture, untied_checkpoint(checkpoint, Path("/tmp/mesh-checkpoint")), partial)
            (partial / ENGINE_RECORD).write_text(json.dumps(
                {"pool": pool, "architecture": architecture, "checkpoint": str(checkpoint), "gpu": gpu,
                 "versions": identity_versions, "build": {n: settings[n] for n in ENGINE_SHAPING}}, indent=2))
            # Only a finished build becomes the engine: an interrupted one is rebuilt on the next start.
            partial.rename(engine_dir)
        finally:
            shutil.rmtree(lock, ignore_errors=True)
    point_repository(repository / pool / "tensorrt_llm" / "config.pbtxt", engine_dir)
    print(f"engine for {pool}: {engine_dir}")


if __name__ == "__main__":
    main(sys.argv)

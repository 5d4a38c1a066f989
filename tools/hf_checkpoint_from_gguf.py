"""Writes the Hugging Face files of a GGUF model's tokenizer and configuration (tokenizer.json,
tokenizer_config.json with the chat template, config.json) from the GGUF itself, so the TensorRT-LLM pools'
`hf:` tokenizer path runs in CI on SmolLM2's own vocabulary without a model hub. The vocabulary, merges, token
types, special ids and chat template are the GGUF's; the pre-tokenizer is the one llama.cpp names for it
(`tokenizer.ggml.pre`). tests/integration/test_trtllm_image_python.py checks the result against llama.cpp's own
tokenization of the same GGUF, id for id.

Runs in the image-packages environment (requirements/trtllm-image.txt: gguf, numpy):
`python -m tools.hf_checkpoint_from_gguf --gguf FILE --out DIR`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gguf import GGUFReader

# llama.cpp's pre-tokenizer types as Hugging Face pre-tokenizers. "smollm" splits every digit apart, then the
# GPT-2 byte-level regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM regexes).
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
}
CONTROL = 3  # llama.cpp's token type of special (control) tokens


def _value(reader: GGUFReader, key: str):
    field = reader.fields[key]
    parts = [field.parts[i] for i in field.data]
    if field.types and field.types[0].name == "STRING" and len(field.types) == 1:
        return bytes(parts[0]).decode("utf-8")
    if field.types and field.types[0].name == "ARRAY":
        if field.types[-1].name == "STRING":
            return [bytes(p).decode("utf-8") for p in parts]
        return [int(p[0]) for p in parts]
    return parts[0][0].item()


def tokenizer_json(reader: GGUFReader) -> dict:
    model = _value(reader, "tokenizer.ggml.model")
    pre = _value(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre not in PRE_TOKENIZERS:
        raise SystemExit(f"a {model}/{pre} tokenizer: only byte-level BPE with a known pre-tokenizer is written")
    tokens = _value(reader, "tokenizer.ggml.tokens")
    types = _value(reader, "tokenizer.ggml.token_type")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind == CONTROL]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": _value(reader, "tokenizer.ggml.merges")},
    }


def tokenizer_config(reader: GGUFReader) -> dict:
    tokens = _value(reader, "tokenizer.ggml.tokens")
    return {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "bos_token": tokens[_value(reader, "tokenizer.ggml.bos_token_id")],
            "eos_token": tokens[_value(reader, "tokenizer.ggml.eos_token_id")],
            "unk_token": tokens[_value(reader, "tokenizer.ggml.unknown_token_id")]
            if "tokenizer.ggml.unknown_token_id" in reader.fields else None,
            "model_max_length": _value(reader, "llama.context_length"),
            "chat_template": _value(reader, "tokenizer.chat_template")}


def model_config(reader: GGUFReader) -> dict:
    """config.json as the checkpoint's: a GGUF without an output tensor ties its embeddings."""
    arch = _value(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"architecture {arch!r}: only llama is written")
    names = {tensor.name for tensor in reader.tensors}
    get = lambda key: _value(reader, f"llama.{key}")  # noqa: E731
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": get("embedding_length"), "intermediate_size": get("feed_forward_length"),
            "num_hidden_layers": get("block_count"), "num_attention_heads": get("attention.head_count"),
            "num_key_value_heads": get("attention.head_count_kv"),
            "max_position_embeddings": get("context_length"), "rope_theta": get("rope.freq_base"),
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
            "vocab_size": len(_value(reader, "tokenizer.ggml.tokens")),
            "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"),
            "tie_word_embeddings": "output.weight" not in names, "torch_dtype": "bfloat16"}


def write(gguf: Path, out: Path) -> None:
    reader = GGUFReader(str(gguf))
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (("tokenizer.json", tokenizer_json(reader)), ("tokenizer_config.json",
                          tokenizer_config(reader)), ("config.json", model_config(reader))):
        (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write(args.gguf, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

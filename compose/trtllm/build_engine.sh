#!/bin/sh
# Builds one pool's TensorRT-LLM engine into the engines volume, once: a later start finds it and exits at once.
# Run by the compose service engine-builder-<pool> in the tritonserver TensorRT-LLM image, on that pool's GPU
# (an engine is built for the GPU it runs on). Settings: /trtllm-models/<pool>.env, written by tools/fill_trtllm.py.
set -eu
POOL="$1"
. "/trtllm-models/${POOL}.env"
if [ -f "${ENGINE_DIR}/config.json" ] && ls "${ENGINE_DIR}"/rank0.engine >/dev/null 2>&1; then
  echo "engine for ${POOL} already in ${ENGINE_DIR}"; exit 0
fi
if [ ! -f "${HF_CHECKPOINT}/config.json" ]; then
  echo "no Hugging Face checkpoint at ${HF_CHECKPOINT}: put the model there (MESH_HF_MODELS in compose/.env)" >&2
  exit 1
fi
CHECKPOINT="/tmp/checkpoint-${POOL}"
QUANT=""
if [ -n "${WEIGHT_ONLY}" ]; then QUANT="--use_weight_only --weight_only_precision ${WEIGHT_ONLY}"; fi
# shellcheck disable=SC2086 - QUANT is several words or none
python3 "${CONVERT_SCRIPT}" --model_dir "${HF_CHECKPOINT}" --output_dir "${CHECKPOINT}" --dtype "${DTYPE}" ${QUANT}
trtllm-build --checkpoint_dir "${CHECKPOINT}" --output_dir "${ENGINE_DIR}.partial" \
  --gemm_plugin auto --gpt_attention_plugin auto --paged_kv_cache enable --use_paged_context_fmha enable \
  --remove_input_padding enable --max_batch_size "${MAX_BATCH_SIZE}" --max_input_len "${MAX_INPUT_LEN}" \
  --max_seq_len "${MAX_SEQ_LEN}" --max_num_tokens "${MAX_NUM_TOKENS}"
# Only a finished build becomes the engine: an interrupted one is rebuilt on the next start.
rm -rf "${ENGINE_DIR}" && mv "${ENGINE_DIR}.partial" "${ENGINE_DIR}"
echo "built ${ENGINE_DIR}"

# CMAKE_ARGS for llama-cpp-python's llama.cpp, read by the Makefile and docker/Dockerfile (lines not starting
# with #). x86-64-v3 (AVX2/FMA/F16C), not -march=native: on CPUs with AMX the native build's batched kernels put
# prompt logits 7 to 18 off the single-token path (0.5 to 1 with these flags), and the answers got worse.
-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
-DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF

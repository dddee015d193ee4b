#!/usr/bin/env bash
# make gpu-report OUT_DIR=DIR, on a GPU machine with no network: uses the python3 there
# and its torch/triton, installs nothing. Builds the extensions in place, runs every CUDA
# kernel once, the whole test suite on the GPU, the benchmarks and the examples, and leaves
# in DIR: report.md, results.json, pytest.log, logs.txt (nvidia-smi, build, CUDA smoke run,
# bench output), matmul.png, attention.png, cifar_resnet.png, gpt_char.png: the 8 files the
# device tool brings back (the examples' curves are in results.json too). Each stage has its
# own time limit so that the whole fits in 10 minutes and a hang in one stage still leaves
# the others' files.
set -uo pipefail
OUT=${1:-bench/out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/tools/gpu_env.sh"

RAW=$(mktemp -d)  # logs and side files, folded into logs.txt at the end
nvidia-smi > "$RAW/nvidia-smi.txt" 2>&1

start=$SECONDS
timeout 90 "$PY" setup.py build_ext --inplace > "$RAW/build.log" 2>&1
echo "build: rc=$? in $((SECONDS - start)) s" | tee -a "$RAW/build.log"

# Every CUDA kernel once, results checked (tools/sanitize_cuda.py): the first word on
# kernels that have never run, in seconds, before a failing kernel can poison the suite.
start=$SECONDS
timeout -k 5 40 "$PY" tools/sanitize_cuda.py > "$RAW/cuda_smoke.log" 2>&1
echo "cuda smoke: rc=$? in $((SECONDS - start)) s" | tee -a "$RAW/cuda_smoke.log"

# One autotune config per kernel in the test run (hundreds of dtype x layout x config
# compilations otherwise); every config is still checked by test_every_autotune_config.
# pytest-xdist, where installed, spreads the Triton compilations over the CPU cores.
parallel=""
"$PY" -c "import xdist" 2>/dev/null && parallel="-n 8"
start=$SECONDS
# SIGINT at the limit: pytest then still prints the summary of what it ran.
TILESMITH_TRITON_AUTOTUNE=first timeout -s INT -k 15 215 "$PY" -m pytest tests -q -rs $parallel \
  -p no:cacheprovider > "$OUT/pytest.log" 2>&1
echo "tests: rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/pytest.log"
tail -3 "$OUT/pytest.log"

# Worst case 90 + 45 + 230 + 230 s, inside the device tool's 600 s per command.
# The quick sweep (matmul squares 1k-8k and two LLM shapes; attention at 1k/4k/16k tokens
# per sequence, d=128) fits the 10 minutes; `make bench` runs the full one.
start=$SECONDS
timeout -s INT -k 15 215 "$PY" -m bench.run --quick --out "$OUT" --pytest-log "$OUT/pytest.log" \
  --build-log "$RAW/build.log" > "$RAW/bench.log" 2>&1
echo "bench: rc=$? in $((SECONDS - start)) s" | tee -a "$RAW/bench.log"
for f in "$OUT"/*.json; do [ "$(basename "$f")" = results.json ] || mv "$f" "$RAW/"; done
for f in nvidia-smi.txt build.log cuda_smoke.log bench.log; do
  echo "===== $f"; cat "$RAW/$f"
done > "$OUT/logs.txt"
tail -40 "$RAW/bench.log"

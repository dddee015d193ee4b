#!/usr/bin/env bash
# make gpu-report OUT_DIR=DIR, on a GPU machine with no network: uses the python3 there
# and its torch/triton, installs nothing. Builds the extensions in place, runs every CUDA
# kernel once, the whole test suite on the GPU, the benchmarks and the examples, and leaves
# in DIR: report.md, results.json, pytest.log, logs.txt (nvidia-smi, build, TMA probe,
# CUDA smoke run, bench output), matmul.png, attention.png, cifar_resnet.png, gpt_char.png:
# the 8 files the device tool brings back (the examples' curves are in results.json too).
# Each stage has its own time limit so that the whole fits in 10 minutes and a hang in one
# stage still leaves the others' files.
set -uo pipefail
OUT=${1:-bench/out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/tools/gpu_env.sh"

RAW=$(mktemp -d)  # logs and side files, folded into logs.txt at the end
nvidia-smi > "$RAW/nvidia-smi.txt" 2>&1

# The device tool stops a command at 600 s; the stages share 580 of them. A clean build is
# 460-700 CPU-seconds (225-465 s on 2 cores), its slowest file 30-60 s: the two extensions
# compile at once, so about a minute on the GPU machine's 16 cores, and up to 150 s are
# allowed; the tests then get half of what is left, at most 215 s, and the benchmarks the
# rest, each keeping in reserve the 15 s it may take to stop after its SIGINT.
BUDGET=${GPU_REPORT_SECONDS:-580}
begin=$SECONDS
seconds_left() { echo $((BUDGET - (SECONDS - begin))); }
# A stage's limit: in 10 .. 215 s (timeout 0 would mean none).
capped() { if (($1 > 215)); then echo 215; elif (($1 < 10)); then echo 10; else echo "$1"; fi; }

start=$SECONDS
timeout 150 "$PY" setup.py build_ext --inplace > "$RAW/build.log" 2>&1
echo "build: rc=$? in $((SECONDS - start)) s" | tee -a "$RAW/build.log"

# The TMA-fed kernels (matmul/gemm, dense and packed attention, scaled_gemm) alone, in a process
# of their own: if they fail or hang, every later stage runs with TILESMITH_TMA_KERNELS=0
# (the cp.async wgmma kernels), so that they cannot take the rest of the report down.
start=$SECONDS
timeout -k 5 30 "$PY" tools/sanitize_cuda.py --tma-probe > "$RAW/tma_probe.log" 2>&1
rc=$?
echo "tma probe: rc=$rc in $((SECONDS - start)) s" | tee -a "$RAW/tma_probe.log"
if ((rc != 0)); then
  export TILESMITH_TMA_KERNELS=0
  echo "TMA kernels OFF for the rest of this report (TILESMITH_TMA_KERNELS=0)" \
    | tee -a "$RAW/tma_probe.log"
fi

# Every CUDA kernel once, results checked (tools/sanitize_cuda.py): the first word on
# kernels that have never run, in seconds, before a failing kernel can poison the suite.
start=$SECONDS
timeout -k 5 40 "$PY" tools/sanitize_cuda.py > "$RAW/cuda_smoke.log" 2>&1
echo "cuda smoke: rc=$? in $((SECONDS - start)) s" | tee -a "$RAW/cuda_smoke.log"

# One autotune config per kernel in the test run (hundreds of dtype x layout x config
# compilations otherwise); every config is still checked by test_every_autotune_config.
# pytest-xdist, where installed, spreads the Triton compilations over the CPU cores.
# tests/test_cuda_emulated.py runs the CUDA kernels on the CPU emulator: minutes of CPU
# that check what this stage runs for real (and that CI runs on every submission), so it
# goes last: a run cut off at the limit has run the GPU tests.
parallel=""
"$PY" -c "import xdist" 2>/dev/null && parallel="-n 8"
start=$SECONDS
limit=$(capped $((($(seconds_left) - 30) / 2)))
# SIGINT at the limit: pytest then still prints the summary of what it ran.
emulated=tests/test_cuda_emulated.py
TILESMITH_TRITON_AUTOTUNE=first timeout -s INT -k 15 "$limit" "$PY" -m pytest -q -rs \
  $(ls tests/test_*.py | grep -vx "$emulated") "$emulated" $parallel -p no:cacheprovider \
  > "$OUT/pytest.log" 2>&1
echo "tests: rc=$? in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/pytest.log"
tail -3 "$OUT/pytest.log"

# The quick sweep (matmul squares 1k-8k and two LLM shapes; attention at 1k/4k/16k tokens
# per sequence, d=128; ...), each op family in a process of its own (bench/run.py), until
# the time left runs out; `make bench` runs the full one.
start=$SECONDS
limit=$(($(seconds_left) - 20))
((limit < 10)) && limit=10
timeout -s INT -k 15 "$limit" "$PY" -m bench.run --quick --out "$OUT" \
  --pytest-log "$OUT/pytest.log" --build-log "$RAW/build.log" > "$RAW/bench.log" 2>&1
echo "bench: rc=$? in $((SECONDS - start)) s (limit $limit s)" | tee -a "$RAW/bench.log"
for f in "$OUT"/*.json; do [ "$(basename "$f")" = results.json ] || mv "$f" "$RAW/"; done
for f in nvidia-smi.txt build.log tma_probe.log cuda_smoke.log bench.log; do
  echo "===== $f"; cat "$RAW/$f"
done > "$OUT/logs.txt"
tail -40 "$RAW/bench.log"

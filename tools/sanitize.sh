#!/usr/bin/env bash
# make gpu-sanitize OUT_DIR=DIR, on a GPU machine: tools/sanitize_cuda.py (every CUDA kernel
# once, results checked) plainly and then under compute-sanitizer's memcheck, racecheck and
# synccheck. Builds the extensions in place first if they are not there. Leaves
# sanitize.log in DIR. Each run has its own time limit; the whole fits in 10 minutes.
set -uo pipefail
OUT=${1:-bench/out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/tools/gpu_env.sh"
# The caching allocator hides out-of-bounds accesses inside its own blocks.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
LOG="$OUT/sanitize.log"
: > "$LOG"

if ! "$PY" -c "import tilesmith._C, tilesmith._C_sm90a" 2>/dev/null; then
  start=$SECONDS
  timeout 150 "$PY" setup.py build_ext --inplace > "$OUT/sanitize-build.log" 2>&1
  echo "build: rc=$? in $((SECONDS - start)) s" | tee -a "$LOG"
fi
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")

start=$SECONDS
echo "===== plain" >> "$LOG"
timeout 60 "$PY" tools/sanitize_cuda.py >> "$LOG" 2>&1
echo "plain: rc=$? in $((SECONDS - start)) s" | tee -a "$LOG"
for tool in memcheck synccheck racecheck; do
  start=$SECONDS
  echo "===== $tool" >> "$LOG"
  timeout -k 10 130 "$SANITIZER" --tool "$tool" --error-exitcode 3 \
    "$PY" tools/sanitize_cuda.py >> "$LOG" 2>&1
  echo "$tool: rc=$? in $((SECONDS - start)) s (3: the tool found errors, 124: time limit)" \
    | tee -a "$LOG"
done
grep -E "^(FAIL|=========.*(ERROR|error)|.*failed)" "$LOG" | head -40

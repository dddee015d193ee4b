# Sourced by tools/gpu_report.sh and tools/sanitize.sh: the environment both run in on a GPU
# machine (its own python3, torch and toolkit; nothing installed). Expects OUT and ROOT set;
# leaves OUT absolute, the working directory at ROOT and PY the python to run.
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

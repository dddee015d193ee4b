"""Every Triton kernel compiles for the GPUs we target (sm_80, sm_90), on a machine without
one: the interpreter runs kernels as Python and misses what only the compiler rejects (it
found a module-level constant read inside a kernel, which the GPU compiler refuses)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_GPU

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the kernels are compiled (and run) by the tests "
                    "that launch them")
def test_every_triton_kernel_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile, do not reuse
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--targets", "80,90",
         "--jobs", str(os.cpu_count() or 1)], env=env, capture_output=True, text=True,
        timeout=1800)
    failed = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert result.returncode == 0 and not failed, (result.stdout[-4000:] + result.stderr[-4000:])
    assert " 0 failed" in result.stdout.splitlines()[-1]

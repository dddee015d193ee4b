"""Every Triton kernel compiles for the GPUs we target (sm_80, sm_90), on a machine without
one: the interpreter runs kernels as Python and misses what only the compiler rejects (it
found a module-level constant read inside a kernel, which the GPU compiler refuses)."""

import importlib.util
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
    failed = [line for line in result.stdout.splitlines()
              if "FAILED" in line or "FIXED LAUNCH" in line]
    assert result.returncode == 0 and not failed, (result.stdout[-4000:] + result.stderr[-4000:])
    assert " 0 failed" in result.stdout.splitlines()[-1]


def test_resource_report_fails_fixed_launches_that_spill_or_overflow_shared_memory():
    """The tool's verdict on one cubin's resources: a strict (fixed, 16-bit or fp8) launch
    that spills or needs more shared memory than the target has fails; an autotune config or
    fp32 launch that does is noted; a compile error fails, an fp8 skip on sm_80 does not."""
    spec = importlib.util.spec_from_file_location("compile_kernels",
                                                  ROOT / "tools" / "compile_kernels.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    judge = tool._judge
    clean = dict(shared=32768, registers=168, stack=0)
    spills = dict(shared=32768, registers=255, stack=48)
    a100_too_big = dict(shared=196608, registers=200, stack=0)  # fits an H100's 232448 B
    assert judge(90, True, clean) == ("ok, 32768 B shared, 168 registers, 0 B stack", None)
    line, problem = judge(90, True, spills)
    assert problem == "FIXED LAUNCH spills registers to the stack" and line.startswith(problem)
    line, problem = judge(90, False, spills)
    assert problem is None and "(noted: spills registers to the stack)" in line
    assert "sm_80's 166912 B of shared memory" in judge(80, True, a100_too_big)[1]
    assert judge(90, True, a100_too_big)[1] is None
    assert judge(90, False, "FAILED: CompilationError: x")[1] == "FAILED: CompilationError: x"
    assert judge(80, True, "skipped (fp8 needs sm_89+)")[1] is None

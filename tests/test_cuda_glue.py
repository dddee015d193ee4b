"""The cuda backend's Python, on the CPU: the op tests' own checks (float64 references, the
2x rule, memory formats), run with backend="cuda" on CPU tensors whose registered cuda ops
are tests/cuda_standins.py's PyTorch stand-ins. What this covers is everything around the
kernels: argument marshalling, zero-filled channels, layouts, the autograd formulas and
the backward ops they call, each stand-in checking the C++ function's preconditions. The
kernels themselves: test_cuda_emulated and the GPU run."""

import pytest
import torch
import test_conv2d as conv2d_tests
import test_gemm as gemm_tests
import test_matmul as matmul_tests
from conftest import HAS_GPU

import tilesmith
from tilesmith import testing

import cuda_standins

pytestmark = pytest.mark.skipif(HAS_GPU, reason="on a GPU the op tests run the cuda backend "
                                                "itself")

LOW_PRECISION = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(autouse=True)
def standins():
    with cuda_standins.enabled():
        yield


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", matmul_tests.SAMPLE_NAMES)
def test_matmul_forward(dtype, name):
    matmul_tests.test_forward_matches_float64("cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", matmul_tests.GRAD_SAMPLES)
def test_matmul_gradients(dtype, name):
    matmul_tests.test_gradients_match_float64("cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", [s.name for s in testing.gemm_sample_inputs("cpu", torch.float16)])
def test_gemm_forward_and_gradients(dtype, name):
    gemm_tests.test_forward_and_gradients_match_float64("cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", conv2d_tests.SAMPLE_NAMES)
def test_conv2d_forward_and_gradients(dtype, name):
    conv2d_tests.test_forward_and_gradients_match_float64("cuda", dtype, name)


def test_standins_are_what_runs():
    """The cuda backend is picked and reaches the stand-ins (not the torch backend)."""
    calls = []
    real = cuda_standins.STANDINS["conv2d_fwd_cuda"]
    x = torch.randn(1, 8, 5, 5, dtype=torch.bfloat16)
    w = torch.randn(8, 8, 3, 3, dtype=torch.bfloat16)
    library = torch.library.Library("tilesmith", "IMPL")
    library.impl("conv2d_fwd_cuda", lambda *args: calls.append(1) or real(*args), "CPU")
    try:
        tilesmith.ops.conv2d(x, w, backend="cuda")
    finally:
        library._destroy()
    assert calls == [1]

"""Test configuration. Without a GPU the Triton kernels run through the interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is first imported, hence here."""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tilesmith import backend, testing  # noqa: E402  (after TRITON_INTERPRET)

# Under pytest-xdist (`make test` runs a worker per core) each worker gets its share of the
# cores for torch's CPU ops, rather than every worker starting a thread per core.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1)
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")

# PyTorch computes fp32 convolutions on the GPU in TF32 by default (cuDNN's allow_tf32), its
# fp32 matmuls in IEEE fp32 ("highest" matmul precision); tilesmith's fp32 kernels follow
# the matmul precision for both (README). The tests hold fp32 models and ops to IEEE-level
# agreement with torch's, so torch's convolutions here run in IEEE fp32 too.
torch.backends.cudnn.allow_tf32 = False

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none on this machine)")
# The cuda backend's matmul/gemm run on wgmma (tilesmith._C_sm90a) on compute capability 9.0.
HOPPER_KERNELS = (HAS_GPU and torch.cuda.get_device_capability() == (9, 0)
                 and backend._C is not None and backend._C_SM90A is not None)
requires_hopper_kernels = pytest.mark.skipif(
    not HOPPER_KERNELS, reason="needs an sm_90 GPU (H100/H200) and tilesmith._C and _C_sm90a built")


def cuda_kernel_names(fn) -> str:
    """The names of the CUDA kernels ``fn()`` launches, space-separated (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return " ".join(event.key for event in profile.key_averages())


def kernel_backends(op: str, dtype: torch.dtype | None = None) -> list:
    """tilesmith's own backends for ``op`` as pytest params: available ones run, the others
    are skipped with the reason they cannot run here."""
    params = []
    for name in ("cuda", "triton"):
        why = backend.unavailable_reason(name, op, DEVICE, dtype)
        marks = [pytest.mark.skip(reason=why)] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def backend_dtype_params(op: str, dtypes) -> list:
    """(backend, dtype) params for tilesmith's own backends of ``op`` over ``dtypes``."""
    return [pytest.param(b.values[0], dt, marks=b.marks,
                         id=f"{b.values[0]}-{str(dt).removeprefix('torch.')}")
            for dt in dtypes for b in kernel_backends(op, dt)]


def compile_backends(op: str, dtype: torch.dtype) -> list:
    """Backends for the torch.compile tests: the torch one, and on a GPU the kernels' (the
    compiled graph of a triton_op cannot run under the Triton interpreter)."""
    return ["torch", *(kernel_backends(op, dtype) if HAS_GPU else [])]


def check_compiled_dynamic(f, calls, min_sqnr_db=None):
    """torch.compile(f, fullgraph=True, dynamic=True), called with each tuple of arguments in
    ``calls`` (shapes differing between them, so symbolic): its result and the gradients of
    the inputs that require grad against eager f. In fp16/bf16 to about an ulp of the
    tensor's largest value: inductor keeps the PyTorch ops around ours in fp32 where eager
    rounds each one's result (and autotunes Triton kernels on its own, so their tiles, and
    the order of their sums, may differ). With ``min_sqnr_db``, to that signal-to-noise
    ratio instead: for FP8, where an ulp's difference before a quantization can move a
    value by a whole fp8 step."""
    def check(got, want):
        if min_sqnr_db is not None:
            assert testing.sqnr_db(got, want) >= min_sqnr_db
        elif got.dtype in (torch.float16, torch.bfloat16):
            ulp = torch.finfo(got.dtype).eps * want.abs().max().float().item()
            torch.testing.assert_close(got, want, rtol=2 * torch.finfo(got.dtype).eps,
                                       atol=ulp)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for args in calls:
        got, want = compiled(*args), f(*args)
        check(got, want)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if leaves:
            grads = torch.autograd.grad(got.float().square().sum(), leaves)
            for grad, expected in zip(grads, torch.autograd.grad(want.float().square().sum(),
                                                                 leaves)):
                check(grad, expected)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""tilesmith.ops.matmul against float64 references (GUIDE §3), every sample × backend."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import (DEVICE, HAS_GPU, backend_dtype_params, check_compiled_dynamic,
                      compile_backends, cuda_kernel_names, kernel_backends, requires_gpu,
                      requires_hopper_kernels)

import tilesmith
from tilesmith import testing
from tilesmith.kernels.matmul import GPU_CONFIGS

LOW_PRECISION = (torch.float16, torch.bfloat16)


SAMPLE_NAMES = [s.name for s in testing.matmul_sample_inputs("cpu", torch.float32,
                                                              large=HAS_GPU)]


def _sample(name, dtype, large=False):
    return {s.name: s for s in testing.matmul_sample_inputs(DEVICE, dtype, large=large)}[name]


def _reference(a, b):
    return torch.matmul(a.double(), b.double())


def _check_against_reference(out, a, b, tf32=False):
    ref = _reference(a, b)
    if a.dtype in LOW_PRECISION:
        testing.assert_close_to_reference(out, ref, torch.matmul(a, b))
    else:
        assert out.dtype == a.dtype
        testing.assert_fp32_close(out, ref, tf32=tf32)


def _params(dtypes):
    return backend_dtype_params("matmul", dtypes)


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float16, torch.float32]))
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_forward_matches_float64(backend, dtype, name):
    a, b = _sample(name, dtype, large=HAS_GPU).args
    with testing.poison_outputs():
        out = tilesmith.ops.matmul(a, b, backend=backend)
    assert out.shape == torch.matmul(a, b).shape
    _check_against_reference(out, a, b)


GRAD_SAMPLES = ["17x17x17", "33x127x65", "a_transposed", "both_transposed", "offset_slices",
                "batched_transposed", "broadcast_batch_dims", "broadcast_batch_b2d",
                "matrix_vector", "zero_k"]


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float16, torch.float32]))
@pytest.mark.parametrize("name", GRAD_SAMPLES)
def test_gradients_match_float64(backend, dtype, name):
    sample = _sample(name, dtype)
    # Differentiate through the very views the forward test uses (strides, offsets).
    a, b = testing.grad_views(sample.args)
    with testing.poison_outputs():
        out = tilesmith.ops.matmul(a, b, backend=backend)
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
        grad_a, grad_b = torch.autograd.grad(out, (a, b), grad_out)

    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    ref_a, ref_b = torch.autograd.grad(torch.matmul(a64, b64), (a64, b64), grad_out.double())
    a_t = a.detach().clone().requires_grad_(True)
    b_t = b.detach().clone().requires_grad_(True)
    base_a, base_b = torch.autograd.grad(torch.matmul(a_t, b_t), (a_t, b_t), grad_out)
    for got, ref, base, what in ((grad_a, ref_a, base_a, "grad_a"),
                                 (grad_b, ref_b, base_b, "grad_b")):
        if dtype in LOW_PRECISION:
            testing.assert_close_to_reference(got, ref, base, name=what)
        else:
            testing.assert_fp32_close(got, ref, name=what)


@pytest.mark.parametrize("backend", [p for p in kernel_backends("matmul", torch.float64)])
@pytest.mark.parametrize("name", ["tiny_3x5x4", "tiny_transposed", "tiny_broadcast",
                                  "tiny_batched_vector"])
def test_gradcheck_float64(backend, name):
    sample = _sample(name, torch.float64)
    a, b = (t.detach().clone().requires_grad_(True) for t in sample.args)
    assert torch.autograd.gradcheck(
        lambda x, y: tilesmith.ops.matmul(x, y, backend=backend), (a, b))


@pytest.mark.parametrize("backend", [p for p in kernel_backends("matmul", torch.float64)])
@pytest.mark.parametrize("name", ["tiny_3x5x4", "tiny_transposed", "tiny_broadcast"])
def test_double_backward_gradgradcheck_float64(backend, name):
    """matmul's backward is made of matmul calls, so it differentiates again
    (create_graph=True). fast_mode: PyTorch's check of one random projection of the
    Jacobians."""
    sample = _sample(name, torch.float64)
    a, b = (t.detach().clone().requires_grad_(True) for t in sample.args)
    assert torch.autograd.gradgradcheck(
        lambda x, y: tilesmith.ops.matmul(x, y, backend=backend), (a, b), fast_mode=True)


def _config_id(config):
    kw = config.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
            f"-s{config.num_stages}w{config.num_warps}")


@pytest.mark.skipif("triton" not in tilesmith.available_backends("matmul", DEVICE),
                    reason="triton backend unavailable here")
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("layout", ["nn", "tt"])
def test_every_autotune_config_is_correct(config, layout):
    """Autotuning picks one config per shape; each one in the space must be right on its
    own, edge tiles included (on the CPU through the interpreter, which ignores stages and
    warps but runs the same tile arithmetic)."""
    from tilesmith.kernels.matmul import matmul_kernel
    from tilesmith.ops.matmul import triton_launch_args

    dtype = torch.bfloat16
    m, n, k = (37, 45, 150) if not HAS_GPU else (300, 270, 200)
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(k, n, device=DEVICE, dtype=dtype)
    if layout == "tt":
        a = a.t().contiguous().t()
        b = b.t().contiguous().t()
    c = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    grid, args, constexprs = triton_launch_args(a, b, c)
    matmul_kernel.fn[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                           num_stages=config.num_stages)
    testing.assert_close_to_reference(c, _reference(a, b), torch.matmul(a, b))


def test_spill_grid_stays_within_cudas_y_and_z_limits():
    from tilesmith.ops._library import spill_grid

    assert spill_grid(0) == (0, 0) and spill_grid(1) == (1, 1)
    assert spill_grid(65535) == (65535, 1)
    assert spill_grid(65536) == (65535, 2)  # one program of the second slice used
    assert spill_grid(65535 * 65535) == (65535, 65535)


@pytest.mark.skipif("triton" not in tilesmith.available_backends("matmul", DEVICE),
                    reason="triton backend unavailable here")
def test_triton_batch_past_the_grid_limit_spills_into_axis_2(monkeypatch):
    """A batch larger than a grid axis holds (65535; 4 here) goes over axes 1 and 2; the
    programs of the last slice past the batch write nothing (poisoned outputs would show
    a batch entry left unwritten, or one written twice over the wrong data)."""
    from tilesmith.ops import _library
    from tilesmith.ops.matmul import triton_launch_args

    monkeypatch.setattr(_library, "MAX_GRID_YZ", 4)
    a = torch.randn(10, 19, 23, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(10, 23, 17, device=DEVICE, dtype=torch.bfloat16)
    grid = triton_launch_args(a, b, torch.empty(10, 19, 17))[0]
    assert grid({"BLOCK_M": 16, "BLOCK_N": 16})[1:] == (4, 3)
    with testing.poison_outputs():
        out = tilesmith.ops.matmul(a, b, backend="triton")
    _check_against_reference(out, a, b)


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("matmul", torch.bfloat16))
def test_batch_past_65535_on_the_gpu(backend):
    """70000 small matrices: past one grid axis (Triton spills into axis 2, cuda launches in
    parts), at the real limit rather than a patched one."""
    a = torch.randn(70000, 16, 24, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(70000, 24, 8, device=DEVICE).to(torch.bfloat16)
    _check_against_reference(tilesmith.ops.matmul(a, b, backend=backend), a, b)


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("matmul", torch.bfloat16))
@pytest.mark.parametrize("name", ["17x17x17", "both_transposed", "batched_3d", "zero_k"])
def test_opcheck(backend, name):
    sample = _sample(name, torch.bfloat16)
    a, b = (t.detach().clone().requires_grad_(True) for t in sample.args)
    op = getattr(torch.ops.tilesmith, f"matmul_{backend}")
    torch.library.opcheck(op, (a, b))


@pytest.mark.parametrize("backend", kernel_backends("matmul", torch.bfloat16))
def test_torch_compile_fullgraph(backend):
    if not HAS_GPU:
        pytest.skip("torch.compile of a triton_op fails under the Triton interpreter "
                    "(fake-tensor storage); runs on the GPU")
    a = torch.randn(64, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(96, 80, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)

    def f(x, y):
        return tilesmith.ops.matmul(x, y, backend=backend).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(a, b)
    grads = torch.autograd.grad(loss, (a, b))
    eager_grads = torch.autograd.grad(f(a, b), (a, b))
    torch.testing.assert_close(loss, f(a, b))
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_dispatch_layer():
    """The public function (validation, backend choice, rank handling) traces without graph
    breaks; on the CPU this runs through the torch backend."""
    torch._dynamo.reset()
    a = torch.randn(2, 8, 16, device=DEVICE)
    b = torch.randn(16, 4, device=DEVICE)
    backend = "torch" if not HAS_GPU else None
    compiled = torch.compile(lambda x, y: tilesmith.ops.matmul(x, y, backend=backend),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(a, b), torch.matmul(a, b))


@pytest.mark.parametrize("backend", compile_backends("matmul", torch.bfloat16))
def test_torch_compile_dynamic_shapes(backend):
    """torch.compile(fullgraph=True, dynamic=True): one graph over symbolic shapes, 2-D and
    batched with a broadcast batch."""
    dtype = torch.float32 if backend == "torch" else torch.bfloat16

    def r(*shape):
        return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()

    def f(a, b):
        return tilesmith.ops.matmul(a, b, backend=backend)

    check_compiled_dynamic(f, [(r(5, 7), r(7, 3)), (r(33, 16), r(16, 24)), (r(8, 40), r(40, 9))])
    check_compiled_dynamic(f, [(r(2, 5, 7), r(7, 3)), (r(3, 9, 16), r(16, 24))])


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("matmul", torch.bfloat16))
def test_cuda_graph_capture_and_no_host_sync(backend):
    a = torch.randn(256, 192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(192, 320, device="cuda", dtype=torch.bfloat16)
    tilesmith.ops.matmul(a, b, backend=backend)  # warm up (autotuning, module load)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tilesmith.ops.matmul(a, b, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = tilesmith.ops.matmul(a, b, backend=backend)
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    testing.assert_close_to_reference(out, _reference(a, b), torch.matmul(a, b))


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("matmul", torch.bfloat16))
def test_runs_on_current_stream(backend):
    a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = tilesmith.ops.matmul(a, b, backend=backend)
        checksum = out.float().sum()  # same stream: ordered after the kernel
    stream.synchronize()
    ref = torch.matmul(a.float(), b.float()).sum()
    assert torch.allclose(checksum, ref, rtol=1e-2)


@requires_hopper_kernels
def test_hopper_kernels_take_what_cp_async_can_read():
    a = torch.randn(256, 192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(192, 320, device="cuda", dtype=torch.bfloat16)
    run = lambda x, y: lambda: tilesmith.ops.matmul(x, y, backend="cuda")  # noqa: E731
    assert "matmul_tma_sm90a" in cuda_kernel_names(run(a, b))
    column_major = run(a.t().contiguous().t(), b.t().contiguous().t())
    assert "matmul_tma_sm90a" in cuda_kernel_names(column_major)
    with tilesmith.backend.hopper_kernels(tma=False):
        names = cuda_kernel_names(run(a, b))
    assert "matmul_sm90a" in names and "matmul_tma_sm90a" not in names
    odd_rows = torch.randn(256, 193, device="cuda", dtype=torch.bfloat16)[:, :192]
    names = cuda_kernel_names(run(odd_rows, b))
    assert "matmul_sm80" in names and "sm90a" not in names
    with tilesmith.backend.hopper_kernels(False):
        names = cuda_kernel_names(run(a, b))
    assert "matmul_sm80" in names and "sm90a" not in names


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_cp_async_kernel_on_hopper(dtype, name):
    """On an H100 matmul takes the TMA kernel where it can: the cp.async wgmma kernel on the
    same samples, forward and (where the sample has them) gradients."""
    with tilesmith.backend.hopper_kernels(tma=False):
        test_forward_matches_float64("cuda", dtype, name)
        if name in GRAD_SAMPLES:
            test_gradients_match_float64("cuda", dtype, name)


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sm80_kernels_on_hopper(dtype, name):
    """On an H100 the cuda backend takes wgmma where it can: the sm_80 kernels on the same
    samples, forward and (where the sample has them) gradients."""
    with tilesmith.backend.hopper_kernels(False):
        test_forward_matches_float64("cuda", dtype, name)
        if name in GRAD_SAMPLES:
            test_gradients_match_float64("cuda", dtype, name)


# ---- bad input ------------------------------------------------------------------------------

BAD_INPUTS = [
    ("int_dtype", lambda: (torch.ones(3, 4, dtype=torch.int32),
                           torch.ones(4, 5, dtype=torch.int32)),
     TypeError, "float16, bfloat16, float32 or float64"),
    ("mixed_dtype", lambda: (torch.ones(3, 4), torch.ones(4, 5, dtype=torch.float64)),
     TypeError, "same dtype"),
    ("inner_mismatch", lambda: (torch.ones(3, 4), torch.ones(5, 6)),
     ValueError, r"inner dimensions differ: a \(3, 4\) @ b \(5, 6\)"),
    ("batched_inner_mismatch", lambda: (torch.ones(2, 3, 4), torch.ones(2, 5, 6)),
     ValueError, "inner dimensions differ"),
    ("zero_dim", lambda: (torch.tensor(1.0), torch.ones(1, 1)), ValueError, "0-d"),
    ("not_a_tensor", lambda: ([[1.0]], torch.ones(1, 1)), TypeError, "torch.Tensor"),
    ("device_mismatch", lambda: (torch.ones(3, 4), torch.ones(4, 5, device="meta")),
     ValueError, "same device"),
    ("batch_not_broadcastable", lambda: (torch.ones(2, 3, 4), torch.ones(3, 4, 5)),
     ValueError, r"batch dimensions do not broadcast: a \(2, 3, 4\) @ b \(3, 4, 5\)"),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case,make,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(backend, case, make, error, match):
    a, b = make()
    with pytest.raises(error, match=match):
        tilesmith.ops.matmul(a, b, backend=backend)


def test_hopper_kernels_switch_takes_bools_only():
    # A string would have switched them on (truthy) whatever it said.
    with pytest.raises(TypeError, match="hopper_kernels: enabled and tma must be bools, got "
                                        "'no' and"):
        with tilesmith.backend.hopper_kernels("no"):
            pass


def test_cuda_backend_refuses_float32_with_reason():
    a = torch.randn(4, 4, device=DEVICE)
    with pytest.raises(tilesmith.BackendUnavailableError, match="supports float16, bfloat16"):
        tilesmith.ops.matmul(a, a, backend="cuda")


@requires_gpu
def test_cuda_op_rejects_bad_input_without_crashing():
    """The registered op checks again in C++, for callers that bypass tilesmith.ops."""
    if tilesmith.backend._C is None:
        pytest.skip("tilesmith._C is not built")
    op = torch.ops.tilesmith.matmul_cuda
    x = torch.randn(4, 4, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="inner dimensions differ"):
        op(x, torch.randn(5, 4, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(x.float(), x.float())
    with pytest.raises(RuntimeError, match="both be 2-D or both 3-D"):
        op(x, x[None])


# ---- backend choice ---------------------------------------------------------------------------

def test_available_backends_lists_what_runs_here():
    names = tilesmith.available_backends("matmul", DEVICE)
    assert "torch" in names
    assert ("triton" in names) == (HAS_GPU or tilesmith.backend.interpreting())
    assert ("cuda" in names) == (HAS_GPU and tilesmith.backend._C is not None)
    assert "cuda" not in tilesmith.available_backends("matmul", DEVICE, torch.float32)
    with pytest.raises(ValueError, match="unknown op"):
        tilesmith.available_backends("no_such_op")


def test_use_backend_context_and_per_call_precedence(monkeypatch):
    a = torch.randn(8, 8, device=DEVICE)
    picked = []
    real_pick = tilesmith.backend.pick
    monkeypatch.setattr(tilesmith.backend, "pick",
                        lambda op, t, backend=None: picked.append(real_pick(op, t, backend))
                        or picked[-1])
    with tilesmith.use_backend("torch"):
        tilesmith.ops.matmul(a, a)
        if "triton" in tilesmith.available_backends("matmul", DEVICE):
            tilesmith.ops.matmul(a, a, backend="triton")
    assert picked[0] == "torch"
    assert picked[1:] in ([], ["triton"])
    with pytest.raises(ValueError, match="backend must be one of"):
        with tilesmith.use_backend("cublas"):
            pass


def test_use_backend_blocks_belong_to_their_thread():
    """Two threads' blocks, interleaved (the first enters, the second enters, the first
    leaves, the second leaves): each thread's calls take its own block's backend, and the
    default once out of it."""
    a = torch.randn(8, 8, device=DEVICE)
    other = "triton" if "triton" in tilesmith.available_backends("matmul", DEVICE) else "torch"
    default = tilesmith.backend.pick("matmul", a)
    entered_first, entered_second, left_first = (threading.Event() for _ in range(3))
    picked = {}

    def first():
        with tilesmith.use_backend("torch"):
            entered_first.set()
            entered_second.wait(10)
            picked["first"] = [tilesmith.backend.pick("matmul", a)]
        picked["first"].append(tilesmith.backend.pick("matmul", a))
        left_first.set()

    def second():
        entered_first.wait(10)
        with tilesmith.use_backend(other):
            entered_second.set()
            left_first.wait(10)
            picked["second"] = [tilesmith.backend.pick("matmul", a)]
            tilesmith.ops.matmul(a, a)
        picked["second"].append(tilesmith.backend.pick("matmul", a))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert picked == {"first": ["torch", default], "second": [other, default]}


def test_unavailable_backend_says_why():
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU every backend may be available")
    a = torch.randn(4, 4, dtype=torch.bfloat16)
    with pytest.raises(tilesmith.BackendUnavailableError, match="needs CUDA tensors"):
        tilesmith.ops.matmul(a, a, backend="cuda")


def test_default_backend_on_cpu_is_torch():
    a = torch.randn(4, 4)
    assert tilesmith.backend.pick("matmul", a) == "torch"


def test_env_variable_selects_backend():
    code = ("import torch, tilesmith; "
            "print(tilesmith.backend.pick('matmul', torch.randn(2, 2)))")
    env = dict(os.environ, TILESMITH_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "torch"
    env["TILESMITH_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "TILESMITH_BACKEND='nonsense'" in bad.stderr

"""tilesmith.ops.conv2d against torch.nn.functional.conv2d in float64 (GUIDE §3): output and
the gradients of input, weight and bias, through the fused activation."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from conftest import (DEVICE, HAS_GPU, backend_dtype_params, check_compiled_dynamic,
                      compile_backends, cuda_kernel_names, kernel_backends, requires_gpu,
                      requires_hopper_kernels)

import tilesmith
from tilesmith import testing
from tilesmith.ops.conv2d import _torch_conv2d

# The module (tilesmith.ops.conv2d is also the name of the function it exports).
conv2d_ops = importlib.import_module("tilesmith.ops.conv2d")

LOW_PRECISION = (torch.float16, torch.bfloat16)
SAMPLE_NAMES = [s.name for s in testing.conv2d_sample_inputs("cpu", torch.float32,
                                                              large=HAS_GPU)]


def _sample(name, dtype):
    return {s.name: s for s in testing.conv2d_sample_inputs(DEVICE, dtype, large=HAS_GPU)}[name]


def _params(dtypes):
    return backend_dtype_params("conv2d", dtypes)


def _skip_if_backend_cannot(backend, sample):
    """Skip (with the reason) a call the backend's kernels do not take, e.g. groups on cuda."""
    x, weight, _ = sample.args
    why = conv2d_ops.kernel_limits(x, weight, sample.kwargs.get("groups", 1))[backend]
    if why:
        pytest.skip(why)


def _reference(x, weight, bias, kwargs, residual=None):
    kw = dict(kwargs)
    return _torch_conv2d(x, weight, bias, kw.get("stride", 1), kw.get("padding", 0),
                         kw.get("dilation", 1), kw.get("groups", 1), kw.get("activation"),
                         residual)


def _check(got, ref, base, name):
    if got.dtype in LOW_PRECISION:
        testing.assert_close_to_reference(got, ref, base, name=name)
    else:
        testing.assert_fp32_close(got, ref, name=name)


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float16, torch.float32]))
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_forward_and_gradients_match_float64(backend, dtype, name):
    sample = _sample(name, dtype)
    _skip_if_backend_cannot(backend, sample)
    kwargs = dict(sample.kwargs)
    x, weight, bias, residual = testing.grad_views((*sample.args, kwargs.pop("residual", None)))
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    names = [label for label, t in (("grad_input", x), ("grad_weight", weight),
                                    ("grad_bias", bias), ("grad_residual", residual))
             if t is not None]
    with testing.poison_outputs():
        out = tilesmith.ops.conv2d(x, weight, bias, residual=residual, backend=backend,
                                   **kwargs)
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
        grads = torch.autograd.grad(out, inputs, grad_out) if out.numel() else None

    def expression(compute):
        xs = [t.detach().to(compute).requires_grad_(True) for t in inputs]
        leaves = dict(zip(names, xs))
        y = _reference(xs[0], xs[1], leaves.get("grad_bias"), kwargs,
                       leaves.get("grad_residual"))
        return y, (torch.autograd.grad(y, xs, grad_out.to(compute)) if y.numel() else None)

    ref, ref_grads = expression(torch.float64)
    base, base_grads = expression(dtype)
    assert out.shape == ref.shape and out.dtype == dtype
    # suggest_memory_format reads the strides, also where one channel or 1x1 pixels make a
    # tensor contiguous both ways: the format the layers that follow will take.
    assert suggest_memory_format(out) == suggest_memory_format(base), "memory format differs"
    _check(out, ref, base, "out")
    if grads is None:
        return
    assert suggest_memory_format(grads[0]) == suggest_memory_format(base_grads[0]), "grad format"
    for got, want, baseline, what in zip(grads, ref_grads, base_grads, names):
        _check(got, want, baseline, what)


@requires_hopper_kernels
def test_hopper_forward_and_backward_run_on_wgmma():
    x = torch.randn(2, 16, 9, 9, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        tilesmith.ops.conv2d(x, w, padding=1, backend="cuda").sum().backward()

    passes = ("conv2d_fwd_kernel", "conv2d_dgrad_kernel", "conv2d_wgrad_kernel")
    names = cuda_kernel_names(run)
    assert all(f"conv2d_sm90a::{p}" in names for p in passes), names
    assert "conv2d_sm80" not in names, names
    with tilesmith.backend.hopper_kernels(False):
        names = cuda_kernel_names(run)
    assert all(f"conv2d_sm80::{p}" in names for p in passes), names
    assert "conv2d_sm90a" not in names, names


@requires_gpu
@pytest.mark.parametrize("backend,memory_format", [
    ("cuda", torch.contiguous_format), ("cuda", torch.channels_last),
    ("triton", torch.channels_last)], ids=["cuda-nchw", "cuda-channels_last", "triton"])
def test_pointwise_convolution_runs_on_the_gemm_kernels(backend, memory_format):
    """A 1x1 convolution with stride 1 and no padding is a GEMM over the pixels: the cuda
    backend runs its forward, dgrad and wgrad on the matmul kernels, triton its forward and
    dgrad on the gemm kernel (its wgrad on conv2d's, which splits the pixels)."""
    if backend not in tilesmith.available_backends("conv2d"):
        pytest.skip(f"the {backend} backend is not available here")
    x = torch.randn(2, 16, 9, 9, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    w = torch.randn(32, 16, 1, 1, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gemm = "matmul" if backend == "cuda" else "gemm_kernel"

    def forward():
        return tilesmith.ops.conv2d(x, w, backend=backend, activation="relu")

    names = cuda_kernel_names(forward)
    assert gemm in names and "conv2d_fwd_kernel" not in names, names
    out = forward()
    names = cuda_kernel_names(lambda: out.sum().backward())
    assert gemm in names and "conv2d_dgrad_kernel" not in names, names
    assert ("conv2d_wgrad_kernel" in names) == (backend == "triton"), names
    padded = lambda: tilesmith.ops.conv2d(x, w, padding=1, backend=backend)  # noqa: E731
    assert "conv2d_fwd_kernel" in cuda_kernel_names(padded)


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sm80_kernels_on_hopper(dtype, name):
    """On an H100 the cuda conv2d runs on wgmma: the same samples on the sm_80 kernels."""
    with tilesmith.backend.hopper_kernels(False):
        test_forward_and_gradients_match_float64("cuda", dtype, name)


@pytest.mark.parametrize("backend", kernel_backends("conv2d", torch.float64))
@pytest.mark.parametrize("case", [
    dict(stride=2, padding=1), dict(dilation=2, padding=1, groups=2),
    dict(padding=1, activation="gelu"), dict(stride=1, padding=0, activation="silu"),
    dict(stride=3, padding=1, dilation=2)],
    ids=["stride2", "dilation2_groups2", "gelu", "silu", "stride3_dilation2"])
def test_gradcheck_float64(backend, case):
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    x, w, b = r(1, 2, 5, 4), r(2, 2 // case.get("groups", 1), 3, 3), r(2)

    def f(x, w, b):
        return tilesmith.ops.conv2d(x, w, b, backend=backend, **case)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", kernel_backends("conv2d", torch.float64))
def test_pointwise_channels_last_gradcheck(backend):
    """A channels-last 1x1 convolution with stride 1: on triton its forward and dgrad run on
    the gemm kernel (a GEMM over the pixels), through the fused activation."""
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)

    x = r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = r(4, 3, 1, 1).requires_grad_(), r(4).requires_grad_()

    def f(x, w, b):
        return tilesmith.ops.conv2d(x, w, b, activation="gelu", backend=backend)

    assert f(x, w, b).is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", kernel_backends("conv2d", torch.float64))
def test_same_padding_even_kernel_gradcheck(backend):
    """The asymmetric "same" (one more row and column after): the kernels run the
    symmetric padding of the larger side and the op drops the first output row/column."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(3, 2, 2, 3, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()

    def f(x, w):
        return tilesmith.ops.conv2d(x, w, padding="same", activation="silu", backend=backend)

    assert f(x, w).shape == (1, 3, 5, 4)
    torch.testing.assert_close(f(x, w), F.silu(F.conv2d(x, w, padding="same")))
    assert torch.autograd.gradcheck(f, (x, w))


# A residual added before the activation, on each path: (channels, filters, groups, taps),
# channels-last input, and the call.
RESIDUAL_GRADCHECK_CASES = {
    "generic_gelu": ((2, 3, 1, 3), False, dict(padding=1, activation="gelu")),
    "pointwise_silu_channels_last": ((3, 4, 1, 1), True, dict(activation="silu")),
    "depthwise_gelu_stride2": ((3, 3, 3, 3), True, dict(stride=2, padding=1,
                                                         activation="gelu")),
    "same_even_kernel": ((2, 3, 1, 2), False, dict(padding="same")),
}


@pytest.mark.parametrize("backend", kernel_backends("conv2d", torch.float64))
@pytest.mark.parametrize("case", list(RESIDUAL_GRADCHECK_CASES))
def test_residual_gradcheck_float64(backend, case):
    """activation(conv + bias + residual): gradcheck in x, weight, bias and the residual
    (whose gradient is the activation's backward, dz), and gradgradcheck through the double
    backward, which computes the pre-activation again with the residual."""
    (channels, filters, groups, taps), channels_last, kwargs = RESIDUAL_GRADCHECK_CASES[case]
    g = torch.Generator().manual_seed(6)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)

    x = r(2, channels, 5, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = r(filters, channels // groups, taps, taps), r(filters)
    geometry = {key: value for key, value in kwargs.items() if key != "activation"}
    residual = r(*F.conv2d(x, w, groups=groups, **geometry).shape)
    inputs = [t.requires_grad_() for t in (x, w, b, residual)]

    def f(x, w, b, residual):
        return tilesmith.ops.conv2d(x, w, b, groups=groups, residual=residual, backend=backend,
                                    **kwargs)

    want = _reference(x, w, b, dict(kwargs, groups=groups), residual)
    torch.testing.assert_close(f(*inputs), want)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


# Double backward (create_graph=True): (channels, filters, groups) and the call.
DOUBLE_BACKWARD_CASES = {
    "stride2": ((8, 16, 1), dict(stride=2, padding=1)),
    "groups2_dilation2": ((8, 8, 2), dict(dilation=2, padding=2)),
    "gelu": ((8, 16, 1), dict(padding=1, activation="gelu")),
    "silu_stride2": ((8, 8, 1), dict(stride=2, padding=1, activation="silu")),
    "relu": ((8, 16, 1), dict(padding=1, activation="relu")),
    "depthwise_gelu": ((8, 8, 8), dict(padding=1, activation="gelu")),
    "pointwise_silu_channels_last": ((8, 16, 1), dict(activation="silu")),
}


def _double_backward_inputs(case, dtype, device, batch=2, size=7):
    (channels, filters, groups), kwargs = DOUBLE_BACKWARD_CASES[case]
    taps = 1 if case.startswith("pointwise") else 3
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    x = r(batch, channels, size, size)
    if case.endswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    w = r(filters, channels // groups, taps, taps) / (channels // groups * taps * taps) ** 0.5
    return x, w, r(filters), dict(kwargs, groups=groups)


@pytest.mark.parametrize("backend", kernel_backends("conv2d", torch.float64))
@pytest.mark.parametrize("case", [c for c in DOUBLE_BACKWARD_CASES if c != "relu"])
def test_double_backward_gradgradcheck_float64(backend, case):
    """The backward is differentiable (a gradient penalty): dgrad and wgrad have derivatives
    of their own (the other two convolutions) and the fused activation's backward its
    second derivative, with the pre-activation computed again on the graph. (relu is left
    out: gradgradcheck's finite differences would cross its kink; its act'' is 0.)
    fast_mode: PyTorch's check of one random projection of the Jacobians."""
    x, w, b, kwargs = _double_backward_inputs(case, torch.float64, DEVICE, batch=1, size=5)
    inputs = [t.requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return tilesmith.ops.conv2d(x, w, b, backend=backend, **kwargs)

    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def _penalty_gradients(conv, x, w, b, grad_out):
    """A gradient penalty (as WGAN-GP's): the squared norm of the gradients of conv(x, w, b)
    along grad_out with respect to x and w, itself differentiated with respect to x, w, b."""
    out = conv(x, w, b)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad_out, create_graph=True)
    penalty = grad_x.double().square().sum() + grad_w.double().square().sum()
    return torch.autograd.grad(penalty, (x, w, b), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend,dtype", _params(LOW_PRECISION))
@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD_CASES))
def test_double_backward_matches_float64(backend, dtype, case):
    """A gradient penalty's gradients through the double backward, by the 2x rule against
    PyTorch's own in the same dtype."""
    x, w, b, kwargs = _double_backward_inputs(case, dtype, DEVICE)
    grad_out = torch.randn(_reference(x, w, b, kwargs).shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(12)).to(dtype).to(DEVICE)

    def gradients(compute, conv):
        leaves = [t.detach().to(compute).requires_grad_() for t in (x, w, b)]
        return _penalty_gradients(conv, *leaves, grad_out.to(compute))

    def ours(x, w, b):
        return tilesmith.ops.conv2d(x, w, b, backend=backend, **kwargs)

    def pytorch(x, w, b):
        return _reference(x, w, b, kwargs)

    with testing.poison_outputs():
        got = gradients(dtype, ours)
    refs, bases = gradients(torch.float64, pytorch), gradients(dtype, pytorch)
    for out, ref, base, what in zip(got, refs, bases, ["input", "weight", "bias"]):
        assert out.dtype == dtype, what
        testing.assert_close_to_reference(out, ref, base, name=f"penalty grad_{what}")


@pytest.mark.parametrize("backend", ["torch", *kernel_backends("conv2d", torch.float64)])
def test_unbatched_input_as_in_pytorch(backend):
    """(C, H, W) input, as F.conv2d and nn.Conv2d take it: a batch of one, squeezed."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 6, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_()
    out = tilesmith.ops.conv2d(x, w, stride=2, padding=1, activation="relu", backend=backend)
    ref = F.relu(F.conv2d(x, w, stride=2, padding=1))
    assert out.shape == ref.shape == (4, 4, 3)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, w), grad),
                         torch.autograd.grad(ref, (x, w), grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", kernel_backends("conv2d", torch.bfloat16))
@pytest.mark.parametrize("groups", [1, 16], ids=["dense", "depthwise"])
def test_fused_relu_keeps_a_nan_as_torch_relu(backend, groups):
    """A NaN pixel makes NaNs in every output its taps reach, through the fused relu as
    through torch.relu (whose max with 0 the GPU would make 0), in the implicit-GEMM and
    the depthwise kernels."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 9, 9, generator=g).to(torch.bfloat16).to(DEVICE)
    x = x.to(memory_format=torch.channels_last)
    w = torch.randn(16, 16 // groups, 3, 3, generator=g).to(torch.bfloat16).to(DEVICE)
    x[1, 3, 4, 6] = float("nan")
    out = tilesmith.ops.conv2d(x, w, padding=1, groups=groups, activation="relu",
                               backend=backend)
    ref = F.relu(F.conv2d(x.double(), w.double(), padding=1, groups=groups))
    assert ref.isnan().sum() == 9 * (16 if groups == 1 else 1)  # the case is what it says
    assert torch.equal(out.isnan(), ref.isnan())
    base = F.relu(F.conv2d(x, w, padding=1, groups=groups))
    finite = ~ref.isnan()
    testing.assert_close_to_reference(out[finite], ref[finite], base[finite])


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("conv2d", torch.bfloat16))
def test_opcheck_and_compile(backend):
    x, w, b = (t.detach().clone().requires_grad_(True)
               for t in _sample("gelu_channels_last", torch.bfloat16).args)
    if backend == "cuda":
        torch.library.opcheck(torch.ops.tilesmith.conv2d_fwd_cuda,
                              (x, w, b, None, [1, 1], [1, 1], [1, 1], "gelu", True))
    else:
        torch.library.opcheck(torch.ops.tilesmith.conv2d_fwd_triton,
                              (x, w, b, None, [1, 1], [1, 1], [1, 1], 1, "gelu", True))

    # The backward ops too (their outputs' strides against the fake implementations'), on
    # a generic and a depthwise conv in both memory formats.
    for name in ("gelu_channels_last", "relu", "depthwise", "depthwise_c16_k5_stride2_silu"):
        sample = _sample(name, torch.bfloat16)
        sample_x, sample_w, _ = sample.args
        geometry = [[v] * 2 if isinstance(v, int) else list(v) for v in (
            sample.kwargs.get("stride", 1), sample.kwargs["padding"], 1)]
        grad = torch.nn.functional.conv2d(sample_x, sample_w, None, *geometry,
                                          sample.kwargs["groups"])
        groups = [] if backend == "cuda" else [sample.kwargs["groups"]]
        channels_last = sample_x.is_contiguous(memory_format=torch.channels_last)
        for dx_channels_last in (channels_last, not channels_last):
            dgrad = getattr(torch.ops.tilesmith, f"conv2d_dgrad_{backend}")
            torch.library.opcheck(dgrad, (grad, sample_w, list(sample_x.shape), *geometry,
                                          *groups, dx_channels_last))
        wgrad = getattr(torch.ops.tilesmith, f"conv2d_wgrad_{backend}")
        torch.library.opcheck(wgrad, (grad, sample_x, list(sample_w.shape), *geometry,
                                      *groups))

    def f(x, w, b):
        return tilesmith.ops.conv2d(x, w, b, padding=1, activation="gelu",
                                    backend=backend).float().square().sum()

    grads = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w, b), (x, w, b))
    eager = torch.autograd.grad(f(x, w, b), (x, w, b))
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", compile_backends("conv2d", torch.bfloat16))
def test_torch_compile_dynamic_shapes(backend):
    """torch.compile(fullgraph=True, dynamic=True): one graph over symbolic batch, channels
    and spatial sizes, with a fused activation, stride 2 and channels_last inputs, and with
    a residual (its gradient too)."""
    dtype = torch.float32 if backend == "torch" else torch.bfloat16

    def r(*shape):
        return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()

    def r_channels_last(*shape):
        x = torch.randn(shape, device=DEVICE).to(dtype).to(memory_format=torch.channels_last)
        return x.requires_grad_()

    def f(x, w, b):
        return tilesmith.ops.conv2d(x, w, b, stride=2, padding=1, activation="relu",
                                    backend=backend)

    check_compiled_dynamic(f, [(r(2, 8, 9, 9), r(16, 8, 3, 3), r(16)),
                               (r(1, 16, 12, 7), r(8, 16, 3, 3), r(8))])
    check_compiled_dynamic(f, [(r_channels_last(2, 8, 9, 9), r(16, 8, 3, 3), r(16)),
                               (r_channels_last(3, 16, 6, 11), r(24, 16, 3, 3), r(24))])

    def with_residual(x, w, b, residual):
        return tilesmith.ops.conv2d(x, w, b, padding=1, activation="relu", residual=residual,
                                    backend=backend)

    check_compiled_dynamic(with_residual, [
        (r_channels_last(2, 8, 9, 9), r(16, 8, 3, 3), r(16), r_channels_last(2, 16, 9, 9)),
        (r_channels_last(1, 16, 6, 7), r(8, 16, 3, 3), r(8), r(1, 8, 6, 7))])


def test_cuda_zero_padding_fills_channels_and_filters_to_multiples_of_8():
    assert conv2d_ops.cuda_zero_padding(16, 24, 1) == (1, 16, 24)  # nothing to fill
    assert conv2d_ops.cuda_zero_padding(3, 64, 1) == (1, 8, 64)  # an RGB first layer
    assert conv2d_ops.cuda_zero_padding(17, 20, 1) == (1, 24, 24)
    assert conv2d_ops.cuda_zero_padding(20, 12, 2) == (2, 16, 8)  # per group
    assert conv2d_ops.cuda_zero_padding(16, 16, 16) == (16, 1, 1)  # depthwise
    assert conv2d_ops.cuda_zero_padding(12, 12, 12) == (16, 1, 1)  # depthwise: more groups
    x, w = torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3)
    assert conv2d_ops.kernel_limits(x, w) == {"triton": None, "cuda": None}
    assert tilesmith.ops.conv2d_kernel_limits is conv2d_ops.kernel_limits


def test_kernel_limits_keep_grid_axes_within_65535_and_name_zero_channels():
    """The GEMM kernels launch a grid slice per group (the cuda wgrad one per group and
    tap, the Triton depthwise ones per block of channels and wgrad tap), and a CUDA grid's
    y and z axes hold 65535: past that a backend steps aside by name (the interpreter would
    not notice)."""
    def limits(channels, weight_shape, groups):
        return conv2d_ops.kernel_limits(torch.empty(1, channels, 8, 8, device="meta"),
                                        torch.empty(weight_shape, device="meta"), groups)

    assert limits(65535 * 2, (65535 * 2, 2, 1, 1), 65535) == {"triton": None, "cuda": None}
    past = limits(65536 * 2, (65536 * 2, 2, 1, 1), 65536)
    assert "one grid slice per group, 65536 here" in past["triton"]
    assert "per group and filter tap in the weight gradient, 65536 here" in past["cuda"]
    # cuda: 8192 groups of 3x3 filters are 73728 slices of the weight gradient's grid.
    assert limits(8192 * 8, (8192 * 8, 8, 3, 3), 8192)["triton"] is None
    assert "73728 here" in limits(8192 * 8, (8192 * 8, 8, 3, 3), 8192)["cuda"]
    # Depthwise (and, on cuda, every one-channel-per-group conv) has no group axis; the
    # Triton depthwise wgrad has a tap axis.
    assert limits(70000, (70000, 1, 3, 3), 70000) == {"triton": None, "cuda": None}
    assert limits(70000, (140000, 1, 3, 3), 70000)["cuda"] is None
    wide = limits(16, (16, 1, 256, 257), 16)
    assert "per filter tap in the weight gradient, 65792 here" in wide["triton"]
    assert wide["cuda"] is None
    # The Triton depthwise kernels put blocks of (at most 64) channels on axis y.
    assert limits(65535 * 16, (65535 * 16, 1, 3, 3), 65535 * 16)["triton"] is None
    huge = limits(65535 * 64 + 1, (65535 * 64 + 1, 1, 3, 3), 65535 * 64 + 1)
    assert "one grid slice per block of" in huge["triton"] and huge["cuda"] is None
    # Nor does the cuda backend take a conv with no input channels.
    assert "at least one input channel per group" in limits(0, (4, 0, 3, 3), 1)["cuda"]
    with pytest.raises(tilesmith.BackendUnavailableError, match="65536 here"):
        tilesmith.ops.conv2d(torch.randn(1, 65536 * 2, 1, 1), torch.randn(65536 * 2, 2, 1, 1),
                             groups=65536, backend="triton")


# (channels, filters, groups, stride, padding, dilation), and the (x, weight) shapes the
# op is called with: a first layer, odd counts, filled groups, a depthwise conv gaining
# channels, channel multipliers (x's channels repeated: depthwise, filled to 16 for 12).
ZERO_FILLED = {
    "rgb_stride2": ((3, 16, 1, 2, 3, 1), (8, 16, 8)),
    "c17_k20": ((17, 20, 1, 1, 1, 1), (24, 24, 24)),
    "groups2_c20_k12": ((20, 12, 2, 1, 1, 2), (32, 16, 16)),
    "depthwise12": ((12, 12, 12, 2, 1, 1), (16, 16, 1)),
    "multiplier2": ((8, 16, 8, 1, 0, 1), (16, 16, 1)),
    "multiplier2_c6": ((6, 12, 6, 2, 1, 1), (16, 16, 1)),
}


@pytest.mark.parametrize("pixels", ["13x11", "1x1"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(ZERO_FILLED))
def test_cuda_conv2d_zero_fills_what_its_kernels_do_not_take(case, memory_format, pixels,
                                                             monkeypatch):
    """conv2d on the cuda backend reaches its op with channels (and filters) per group
    filled to what the kernels take (a channel multiplier's channels repeated), and
    gives the real filters back in the input's memory format, with the gradients of x,
    weight and bias taken back through the copies. The op here is PyTorch's conv in
    float64 (the kernels are the GPU tests'), so this checks the filling and the copies."""
    (channels, filters, groups, stride, padding, dilation), (wide_x, wide_k, wide_c) = \
        ZERO_FILLED[case]
    calls = []

    def forward(x, weight, bias, residual, stride_, padding_, dilation_, activation, save_pre):
        calls.append((tuple(x.shape), tuple(weight.shape), tuple(bias.shape)))
        out = _torch_conv2d(x, weight, bias, stride_, padding_, dilation_,
                            x.shape[1] // weight.shape[1], activation, residual)
        # As the op's C++ returns it: computed channels-last, copied to NCHW for an input
        # that is not channels-last (with NCHW strides, also for 1x1 pixels).
        out = torch.empty_like(out, memory_format=torch.channels_last).copy_(out)
        if not conv2d_ops._is_channels_last(x):
            out = out.clone(memory_format=torch.contiguous_format)
        return out, out.new_empty(0)

    monkeypatch.setattr(conv2d_ops, "_cuda_forward", forward)
    monkeypatch.setattr(conv2d_ops._backend, "pick", lambda *args, **kwargs: "cuda")
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    height, width = (13, 11) if pixels == "13x11" else (1, 1)
    if pixels == "1x1":  # a 1x1 output: contiguous both ways, strides still as PyTorch's
        stride, padding, dilation = 1, 1, 1
    x = torch.randn(2, channels, height, width, dtype=torch.float64).contiguous(
        memory_format=fmt)
    w = torch.randn(filters, channels // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(filters, dtype=torch.float64)
    for t in (x, w, b):
        t.requires_grad_(True)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2)
    out = tilesmith.ops.conv2d(x, w, b, *args, groups, activation="relu")
    assert calls == [((2, wide_x, height, width), (wide_k, wide_c, 3, 3), (wide_k,))]
    ref = _torch_conv2d(x, w, b, *args, groups, "relu")
    torch.testing.assert_close(out, ref)
    assert out.stride() == ref.stride()
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w, b), grad_out)
    ref_grads = torch.autograd.grad(ref, (x, w, b), grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


BAD_INPUTS = [
    ("channel_mismatch", lambda: ((_t(1, 3, 8, 8), _t(4, 5, 3, 3)), {}), ValueError,
     "channel mismatch: weight expects 5"),
    ("groups_not_dividing", lambda: ((_t(1, 6, 8, 8), _t(4, 3, 3, 3)), {"groups": 4}),
     ValueError, "groups=4 must divide"),
    ("rank2_input", lambda: ((_t(8, 8), _t(4, 3, 3, 3)), {}), ValueError, "input must be 4-D"),
    ("rank3_weight", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3)), {}), ValueError,
     "weight must be 4-D"),
    ("int_dtype", lambda: ((torch.ones(1, 3, 8, 8, dtype=torch.int32),
                            torch.ones(4, 3, 3, 3, dtype=torch.int32)), {}), TypeError,
     "float16, bfloat16"),
    ("mixed_dtype", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3, dtype=torch.float64)), {}),
     TypeError, "one dtype"),
    ("device_mismatch", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3, device="meta")), {}),
     ValueError, "input is on cpu, weight on meta"),
    ("bias_shape", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), _t(3)), {}), ValueError,
     r"bias must have shape \(4,\)"),
    ("bias_not_tensor", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), [0.0] * 4), {}), TypeError,
     "bias must be a torch.Tensor or None, got list"),
    ("bias_dtype", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), torch.ones(4, dtype=torch.bool)),
                            {}), TypeError, "bias must be a floating-point tensor, got torch.bool"),
    ("bias_device", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3), _t(4, device="meta")), {}),
     ValueError, "bias is on meta, input on cpu"),
    ("padding_string", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)), {"padding": "SAME"}),
     ValueError, "padding strings are 'same' and 'valid'.*got 'SAME'"),
    ("same_strided", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)), {"padding": "same", "stride": 2}),
     ValueError, "not supported for strided"),
    ("kernel_too_large", lambda: ((_t(1, 3, 4, 4), _t(4, 3, 7, 7)), {}), ValueError,
     "larger than the padded input"),
    ("bad_activation", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)), {"activation": "tanh"}),
     ValueError, "activation must be one of"),
    ("bad_stride", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)), {"stride": (1, 2, 3)}), TypeError,
     "stride must be an int or a pair"),
    ("groups_bool", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)), {"groups": True}), TypeError,
     "groups must be an int, got True"),
    ("groups_float", lambda: ((_t(1, 4, 8, 8), _t(4, 2, 3, 3)), {"groups": 2.0}), TypeError,
     "groups must be an int, got 2.0"),
    # The residual: the output's shape (no broadcasting), the input's dtype and device.
    ("residual_shape", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)), {"residual": _t(1, 4, 8, 8)}),
     ValueError, r"residual must have the output's shape \(1, 4, 6, 6\), got \(1, 4, 8, 8\)"),
    ("residual_broadcast", lambda: ((_t(2, 3, 8, 8), _t(4, 3, 3, 3)),
                                    {"residual": _t(1, 4, 6, 6)}), ValueError,
     r"residual must have the output's shape \(2, 4, 6, 6\)"),
    ("residual_same_even_kernel", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 2, 2)),
                                           {"padding": "same", "residual": _t(1, 4, 9, 9)}),
     ValueError, r"residual must have the output's shape \(1, 4, 8, 8\), got \(1, 4, 9, 9\)"),
    ("residual_dtype", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)),
                                {"residual": _t(1, 4, 6, 6, dtype=torch.float64)}), TypeError,
     "residual must have the input's dtype torch.float32, got torch.float64"),
    ("residual_device", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)),
                                 {"residual": _t(1, 4, 6, 6, device="meta")}), ValueError,
     "residual is on meta, input on cpu"),
    ("residual_not_tensor", lambda: ((_t(1, 3, 8, 8), _t(4, 3, 3, 3)), {"residual": 1.0}),
     TypeError, "residual must be a torch.Tensor or None, got float"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,make,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(backend, case, make, error, match):
    args, kwargs = make()
    with pytest.raises(error, match=match):
        tilesmith.ops.conv2d(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_of_another_float_dtype(backend):
    """Every backend takes a bias whose float dtype differs from the input's (the kernels add
    it in fp32; the torch backend casts it to the input's dtype, as F.conv2d requires), and
    gives it a gradient in its own dtype."""
    x, w = _t(2, 3, 9, 9), _t(4, 3, 3, 3)
    bias = _t(4, dtype=torch.float64).requires_grad_()
    out = tilesmith.ops.conv2d(x, w, bias, padding=1, activation="relu", backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.relu(F.conv2d(x, w, bias.float(), padding=1)))
    (grad_bias,) = torch.autograd.grad(out.sum(), bias)
    assert grad_bias.dtype == torch.float64
    want = (F.conv2d(x, w, bias.detach().float(), padding=1) > 0).sum((0, 2, 3))
    torch.testing.assert_close(grad_bias, want.double())

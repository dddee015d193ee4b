"""tilesmith.ops.gemm (matmul + bias + activation + residual, one kernel) against float64."""

import pytest
import torch
from conftest import (DEVICE, HAS_GPU, backend_dtype_params, check_compiled_dynamic,
                      compile_backends, kernel_backends, requires_gpu, requires_hopper_kernels)

import tilesmith
from tilesmith import testing
from tilesmith.ops.gemm import ACTIVATION_NAMES, _torch_gemm, activation_derivatives

LOW_PRECISION = (torch.float16, torch.bfloat16)
def _sample(name, dtype):
    return {s.name: s for s in testing.gemm_sample_inputs(DEVICE, dtype, large=HAS_GPU)}[name]


def _params(dtypes):
    """(backend, dtype, sample name) for every sample of every dtype."""
    return [pytest.param(b.values[0], dt, s.name, marks=b.marks,
                         id=f"{s.name}-{b.values[0]}-{str(dt).removeprefix('torch.')}")
            for dt in dtypes for b in kernel_backends("gemm", dt)
            for s in testing.gemm_sample_inputs("cpu", dt, large=HAS_GPU)]


def _tensor_kwargs(kwargs):
    return [key for key in ("bias", "residual") if kwargs.get(key) is not None]


def _expression(a, b, kwargs, dtype=None):
    """The same expression through the torch backend, optionally recomputed in ``dtype``."""
    kwargs = dict(kwargs)
    out_dtype = kwargs.pop("out_dtype", None) or a.dtype
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
        kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        out_dtype = dtype
    return _torch_gemm(a, b, kwargs.get("bias"), kwargs.get("residual"), kwargs.get("activation"),
                       float(kwargs.get("alpha", 1.0)), out_dtype)


def _check(got, ref, base, name, input_dtype):
    # The precision class is the inputs': an fp32 bias or output of a bf16 GEMM is as
    # accurate as the bf16 products and gradients it comes from, for PyTorch as for us.
    if input_dtype in LOW_PRECISION:
        testing.assert_close_to_reference(got, ref, base, name=name)
    else:
        testing.assert_fp32_close(got, ref, name=name)


@pytest.mark.parametrize("backend,dtype,name",
                         _params([torch.bfloat16, torch.float16, torch.float32]))
def test_forward_and_gradients_match_float64(backend, dtype, name):
    sample = _sample(name, dtype)
    kwargs = dict(sample.kwargs)
    a, b = testing.grad_views(sample.args)
    extra = _tensor_kwargs(kwargs)
    for key in extra:
        kwargs[key] = testing.grad_views([kwargs[key]])[0]
    inputs = [a, b] + [kwargs[key] for key in extra]

    with testing.poison_outputs():
        out = tilesmith.ops.gemm(a, b, backend=backend, **kwargs)
        grad_out = torch.randn(out.shape, device=DEVICE).to(out.dtype)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)

    def expression_grads(compute):
        xs = [t.detach().to(compute if compute else t.dtype).requires_grad_(True) for t in inputs]
        kw = dict(kwargs, **dict(zip(extra, xs[2:])))
        y = _expression(xs[0], xs[1], kw) if compute is None else _torch_gemm(
            xs[0], xs[1], kw.get("bias"), kw.get("residual"), kw.get("activation"),
            float(kw.get("alpha", 1.0)), compute)
        return y, torch.autograd.grad(y, xs, grad_out.to(y.dtype))

    ref, ref_grads = expression_grads(torch.float64)
    base, base_grads = expression_grads(None)
    assert out.dtype == (kwargs.get("out_dtype") or dtype) and out.shape == ref.shape
    _check(out, ref, base, "out", dtype)
    for got, want, baseline, what in zip(grads, ref_grads, base_grads,
                                         ["grad_a", "grad_b"] + [f"grad_{k}" for k in extra]):
        assert got.dtype == baseline.dtype, what
        _check(got, want, baseline, what, dtype)


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", [s.name for s in testing.gemm_sample_inputs("cpu", torch.bfloat16,
                                                                            large=HAS_GPU)])
def test_sm80_kernels_on_hopper(dtype, name):
    """On an H100 the cuda backend takes wgmma where it can: the sm_80 kernels on the same
    samples."""
    with tilesmith.backend.hopper_kernels(False):
        test_forward_and_gradients_match_float64("cuda", dtype, name)


@pytest.mark.parametrize("backend", kernel_backends("gemm", torch.float64))
@pytest.mark.parametrize("activation", list(ACTIVATION_NAMES))
def test_gradcheck_float64(backend, activation):
    g = torch.Generator().manual_seed(2)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    a, b, bias, residual = r(5, 4), r(3, 4).t(), r(3), r(5, 3)
    if activation == "relu":  # keep pre-activations away from the kink at 0
        bias = (bias.detach() + 3.0 * bias.detach().sign()).requires_grad_()

    def f(a, b, bias, residual):
        return tilesmith.ops.gemm(a, b, bias=bias, residual=residual, activation=activation,
                                  alpha=0.7, backend=backend)

    assert torch.autograd.gradcheck(f, (a, b, bias, residual))


@pytest.mark.parametrize("activation", ACTIVATION_NAMES[1:])
def test_activation_derivatives_match_autograd(activation):
    """The first and second derivatives the double backward uses, against autograd through
    PyTorch's own activations, in float64 (relu6's kink at 6, hardswish's and hardsigmoid's
    at -3 and 3, on the grid)."""
    functions = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
                 "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
                 "silu": torch.nn.functional.silu, "relu6": torch.nn.functional.relu6,
                 "hardswish": torch.nn.functional.hardswish, "sigmoid": torch.sigmoid,
                 # (torch's hardsigmoid has no second derivative; relu6 keeps its kinks')
                 "hardsigmoid": lambda z: torch.nn.functional.relu6(z + 3) / 6}
    z = torch.linspace(-8, 8, 1001, dtype=torch.float64).requires_grad_()
    first, = torch.autograd.grad(functions[activation](z).sum(), z, create_graph=True)
    second, = torch.autograd.grad(first.sum(), z, allow_unused=True, materialize_grads=True)
    got_first, got_second = activation_derivatives(z.detach(), activation)
    # Values of order 1; where tanh(u) rounds to +-1 (|z| > 6), 1 - t^2 is float64's
    # cancellation noise, some 1e-14 in either formula.
    torch.testing.assert_close(got_first, first, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_second, second, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", kernel_backends("gemm", torch.float64))
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu", "hardswish",
                                        "sigmoid"])
def test_double_backward_gradgradcheck_float64(backend, activation):
    """The backward is differentiable (create_graph=True): its GEMMs are gemm calls, the
    activation's backward has its second derivative, and the pre-activation is computed
    again on the graph. (relu, relu6 and hardsigmoid are left out: finite differences would
    cross their kinks; their act'' is 0.) fast_mode: PyTorch's check of one random
    projection of the Jacobians."""
    g = torch.Generator().manual_seed(6)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    a, b, bias, residual = r(5, 4), r(3, 4).t(), r(3), r(5, 3)

    def f(a, b, bias, residual):
        return tilesmith.ops.gemm(a, b, bias=bias, residual=residual, activation=activation,
                                  alpha=0.7, backend=backend)

    assert torch.autograd.gradgradcheck(f, (a, b, bias, residual), fast_mode=True)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params("gemm", LOW_PRECISION))
@pytest.mark.parametrize("activation", list(ACTIVATION_NAMES))
def test_double_backward_matches_float64(backend, dtype, activation):
    """A gradient penalty (the squared norm of the gradients of the output along grad_out
    with respect to a and b) differentiated with respect to a, b, bias and residual, by the
    2x rule against PyTorch's own in the same dtype (hardsigmoid written as relu6(z + 3) / 6:
    PyTorch's has no second derivative)."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)

    m, k, n = 33, 40, 24
    operands = (r(m, k), r(n, k).t() / k**0.5, r(n), r(m, n))
    grad_out = r(m, n)

    def gradients(compute, gemm):
        leaves = [t.detach().to(compute).requires_grad_() for t in operands]
        out = gemm(*leaves)
        grad_a, grad_b = torch.autograd.grad(out, leaves[:2], grad_out.to(compute),
                                             create_graph=True)
        penalty = grad_a.double().square().sum() + grad_b.double().square().sum()
        return torch.autograd.grad(penalty, leaves, allow_unused=True, materialize_grads=True)

    def ours(a, b, bias, residual):
        return tilesmith.ops.gemm(a, b, bias=bias, residual=residual, activation=activation,
                                  alpha=0.7, backend=backend)

    def pytorch(a, b, bias, residual):
        if activation == "hardsigmoid":
            z = _torch_gemm(a, b, bias, None, None, 0.7, a.dtype)
            return torch.nn.functional.relu6(z + 3) / 6 + residual
        return _torch_gemm(a, b, bias, residual, activation, 0.7, a.dtype)

    with testing.poison_outputs():
        got = gradients(dtype, ours)
    refs, bases = gradients(torch.float64, pytorch), gradients(dtype, pytorch)
    for out, ref, base, what in zip(got, refs, bases, ["a", "b", "bias", "residual"]):
        assert out.dtype == dtype, what
        testing.assert_close_to_reference(out, ref, base, name=f"penalty grad_{what}")


def test_hardsigmoid_double_backward_on_the_torch_backend_is_pytorchs():
    """The torch backend runs PyTorch's hardsigmoid, whose backward has no derivative: a
    double backward raises PyTorch's own error there (the kernels' backends have one)."""
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float64)
    out = tilesmith.ops.gemm(a, b, activation="hardsigmoid", backend="torch")
    grad_a, = torch.autograd.grad(out.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        torch.autograd.grad(grad_a.sum(), a)


@pytest.mark.parametrize("backend", kernel_backends("gemm", torch.bfloat16))
def test_fused_relu_keeps_a_nan_as_torch_relu(backend):
    """torch.relu(NaN) is NaN, and its gradient there is the incoming one (threshold_backward
    zeroes where the output <= 0). The fused epilogues took max(z, 0), which the GPU's max
    makes 0 at a NaN: a NaN made upstream vanished from the output. Row 5 of a is NaN."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(40, 24, generator=g).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(24, 32, generator=g).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(32, generator=g).to(torch.bfloat16).to(DEVICE)
    grad = torch.randn(40, 32, generator=g).to(torch.bfloat16).to(DEVICE)
    a[5] = float("nan")
    results = {}
    for name, dtype in ((backend, torch.bfloat16), ("torch", torch.bfloat16),
                        ("torch", torch.float64)):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (a, b, bias)]
        out = tilesmith.ops.gemm(inputs[0], inputs[1], bias=inputs[2], activation="relu",
                                 backend=name)
        out.backward(grad.to(dtype))
        results[name, dtype] = [out.detach()] + [t.grad for t in inputs]
    got, base, ref = (results[backend, torch.bfloat16], results["torch", torch.bfloat16],
                      results["torch", torch.float64])
    names = ("output", "grad a", "grad b", "grad bias")
    for name, got_t, ref_t in zip(names, got, ref):
        assert torch.equal(got_t.isnan(), ref_t.isnan()), f"{name}: NaNs differ"
    assert got[0][5].isnan().all() and got[2].isnan().all()  # grad b: a's NaN row meets dz
    rows = [r for r in range(40) if r != 5]
    testing.assert_close_to_reference(got[0][rows], ref[0][rows], base[0][rows])
    # relu' is 1 at the NaN: a's row 5 gets grad[5] @ b^T, and the bias all of grad[5].
    for name, got_t, base_t, ref_t in list(zip(names, got, base, ref))[1::2]:
        testing.assert_close_to_reference(got_t, ref_t, base_t, name=name)


@pytest.mark.parametrize("backend", kernel_backends("gemm", torch.bfloat16))
def test_no_pre_activation_saved_without_grad(backend):
    a, b = _sample("gelu_only", torch.bfloat16).args
    with torch.no_grad():
        out = tilesmith.ops.gemm(a, b, activation="gelu", backend=backend)
    _, pre = torch.ops.tilesmith.gemm_triton(a, b, None, None, "gelu", 1.0, a.dtype, False)
    assert pre.numel() == 0 and out.shape == (a.shape[0], b.shape[1])


def _activation_backward_matches_float64(backend, activation, grad, pre, dz_dtype=None):
    """activation_backward_<backend> with the bias gradient: dz (in dz_dtype, default pre's)
    within one rounding of the float64 product, the bias gradient (fused column sums)
    against float64. (dz, bias grad)."""
    op = getattr(torch.ops.tilesmith, f"activation_backward_{backend}")
    with testing.poison_outputs():
        dz, bias_grad = op(grad, pre, activation, True, dz_dtype or pre.dtype)
    ref, torch_fp32 = (testing.activation_grad_reference(activation, pre, grad, dtype)
                       for dtype in (torch.float64, torch.float32))
    testing.assert_pointwise_close(dz, ref, torch_fp32, name="dz")
    testing.assert_fp32_close(bias_grad, ref.sum(0), name="bias gradient")
    return dz, bias_grad


@pytest.mark.parametrize("backend", kernel_backends("gemm", torch.bfloat16))
@pytest.mark.parametrize("activation", ACTIVATION_NAMES[1:])
@pytest.mark.parametrize("m,n,grad_dtype,pre_dtype,transposed", [
    # row and column tails of both backends' blocks
    (300, 264, torch.bfloat16, torch.bfloat16, False),
    (129, 37, torch.float32, torch.bfloat16, True),  # an fp32 gradient, column-major, odd width
    (130, 72, torch.float32, torch.float32, False),  # and pre fp32: a gemm with an fp32 output
], ids=["bf16_grad", "fp32_grad_transposed", "fp32_grad_and_pre"])
def test_activation_backward_op(backend, activation, m, n, grad_dtype, pre_dtype, transposed):
    """The backward's elementwise pass on its own, with and without the bias gradient; dz
    in bf16 (the GEMM inputs' dtype) whatever grad's and pre's."""
    pre = (torch.randn(m, n, device=DEVICE) * 2).to(pre_dtype)
    grad = torch.randn(n, m, device=DEVICE).t() if transposed else torch.randn(m, n, device=DEVICE)
    grad = grad.to(grad_dtype)
    dz, bias_grad = _activation_backward_matches_float64(backend, activation, grad, pre,
                                                         torch.bfloat16)
    assert dz.dtype == torch.bfloat16 and dz.shape == (m, n) and bias_grad.dtype == torch.float32
    with testing.poison_outputs():
        dz_alone, no_bias = getattr(torch.ops.tilesmith, f"activation_backward_{backend}")(
            grad, pre, activation, False, torch.bfloat16)
    assert torch.equal(dz_alone, dz) and no_bias.numel() == 0


@pytest.mark.skipif("triton" not in tilesmith.available_backends("gemm", DEVICE),
                    reason="triton backend unavailable here")
def test_triton_activation_backward_column_blocks_spill_into_axis_2(monkeypatch):
    """Column blocks past a grid axis's 65535 (an output 8M wide; 2 here) lie over axes 1
    and 2; the last slice's extra program writes nothing."""
    from tilesmith.ops import _library

    monkeypatch.setattr(_library, "MAX_GRID_YZ", 2)
    pre = (torch.randn(70, 264, device=DEVICE) * 2).to(torch.bfloat16)
    grad = torch.randn(70, 264, device=DEVICE).to(torch.bfloat16)
    _activation_backward_matches_float64("triton", "gelu", grad, pre)


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("gemm", torch.bfloat16))
def test_activation_backward_of_an_output_past_65535_column_blocks_on_the_gpu(backend):
    """3 rows of 8.4M columns: past one grid axis's column blocks of 128 (Triton spills into
    axis 2; the cuda grid is 1-D), at the real limit rather than a patched one."""
    n = 65535 * 128 + 1
    pre = (torch.randn(3, n, device=DEVICE) * 2).to(torch.bfloat16)
    grad = torch.randn(3, n, device=DEVICE).to(torch.bfloat16)
    _activation_backward_matches_float64(backend, "silu", grad, pre)


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("gemm", torch.bfloat16))
def test_opcheck_and_compile(backend):
    sample = _sample("gelu_bias_residual_alpha", torch.bfloat16)
    a, b = (t.detach().clone().requires_grad_(True) for t in sample.args)
    kw = sample.kwargs
    torch.library.opcheck(getattr(torch.ops.tilesmith, f"gemm_{backend}"),
                          (a, b, kw["bias"], kw["residual"], "gelu", 0.5, torch.bfloat16, True))
    pre = torch.randn(70, 136, device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(getattr(torch.ops.tilesmith, f"activation_backward_{backend}"),
                          (torch.randn_like(pre), pre, "gelu", True, pre.dtype))
    # An fp32 output's: pre and grad in fp32, dz in the inputs' bf16.
    torch.library.opcheck(getattr(torch.ops.tilesmith, f"activation_backward_{backend}"),
                          (torch.randn_like(pre).float(), pre.float(), "gelu", True,
                           torch.bfloat16))

    def f(a, b):
        return tilesmith.ops.gemm(a, b, backend=backend, **kw).float().square().sum()

    grads = torch.autograd.grad(torch.compile(f, fullgraph=True)(a, b), (a, b))
    eager = torch.autograd.grad(f(a, b), (a, b))
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", compile_backends("gemm", torch.bfloat16))
def test_torch_compile_dynamic_shapes(backend):
    """torch.compile(fullgraph=True, dynamic=True) of gemm with every epilogue piece: one
    graph over symbolic shapes, b transposed in one call."""
    dtype = torch.float32 if backend == "torch" else torch.bfloat16

    def r(*shape):
        return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()

    def f(a, b, bias, residual):
        return tilesmith.ops.gemm(a, b, bias=bias, residual=residual, activation="gelu",
                                  alpha=0.5, backend=backend)

    check_compiled_dynamic(f, [(r(5, 7), r(7, 3), r(3), r(5, 3)),
                               (r(33, 16), r(16, 24), r(24), r(33, 24)),
                               (r(17, 40), r(9, 40).t(), r(9), r(17, 9))])


def _t(*shape, dtype=torch.bfloat16):
    return torch.randn(shape, dtype=dtype)


BAD_INPUTS = [
    ("rank3", lambda: ((_t(2, 3, 4), _t(4, 5)), {}), ValueError, "a must be 2-D"),
    ("inner_mismatch", lambda: ((_t(3, 4), _t(5, 6)), {}), ValueError,
     r"inner dimensions differ: a \(3, 4\) @ b \(5, 6\)"),
    ("int_dtype", lambda: ((torch.ones(3, 4, dtype=torch.int8), torch.ones(4, 5, dtype=torch.int8)),
                           {}), TypeError, "float16, bfloat16"),
    ("mixed_dtype", lambda: ((_t(3, 4), _t(4, 5, dtype=torch.float16)), {}), TypeError,
     "one dtype"),
    ("bias_shape", lambda: ((_t(3, 4), _t(4, 5)), {"bias": _t(4)}), ValueError,
     r"bias must have shape \(5,\)"),
    ("residual_shape", lambda: ((_t(3, 4), _t(4, 5)), {"residual": _t(5, 3)}), ValueError,
     r"residual must have shape \(3, 5\)"),
    ("bad_activation", lambda: ((_t(3, 4), _t(4, 5)), {"activation": "tanh"}), ValueError,
     "activation must be one of"),
    ("bad_out_dtype", lambda: ((_t(3, 4), _t(4, 5)), {"out_dtype": torch.int32}), TypeError,
     "out_dtype"),
    ("bad_alpha", lambda: ((_t(3, 4), _t(4, 5)), {"alpha": "2"}), TypeError, "alpha"),
    ("device_mismatch", lambda: ((_t(3, 4), torch.randn(4, 5, dtype=torch.bfloat16,
                                                       device="meta")), {}),
     ValueError, "a is on cpu, b on meta"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,make,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(backend, case, make, error, match):
    args, kwargs = make()
    with pytest.raises(error, match=match):
        tilesmith.ops.gemm(*args, backend=backend, **kwargs)

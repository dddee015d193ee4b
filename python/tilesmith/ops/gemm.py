"""gemm: out = activation(alpha * (a @ b) + bias) + residual in one kernel, fp16/bf16 (or
fp32) inputs, fp32 accumulation and epilogue, output in fp16/bf16/fp32.

Layers: ``gemm`` (validation, backend choice) -> ``tilesmith::gemm_triton`` (forward; also
stores the pre-activation when a backward will need it) and
``tilesmith::activation_backward_triton`` -> kernels/gemm.py; or ``tilesmith::gemm_cuda``
(the CUDA matmul kernel with its epilogue switched on) and
``tilesmith::activation_backward_cuda`` -> csrc/gemm/. The activation backward is one
elementwise pass: dz = grad * act'(pre), with dbias = sum(dz) over rows reduced in the same
pass. Then dA = alpha dz B^T and dB = alpha A^T dz with the gemm op itself, and
dresidual = grad.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch.library import triton_op

from ._library import (LIBRARY, autocast_inputs, dot_precision, new_output,
                       register_autocast, spill_grid, wrap_triton)

LIBRARY.define("gemm_cuda(Tensor a, Tensor b, Tensor? bias, Tensor? residual, str activation, "
               "float alpha, ScalarType out_dtype, bool save_pre) -> (Tensor, Tensor)")
LIBRARY.define("activation_backward_cuda(Tensor grad, Tensor pre, str activation, bool bias_grad, "
               "ScalarType dz_dtype) -> (Tensor, Tensor)")

from .. import backend as _backend  # noqa: E402  (loads tilesmith._C after the schema)

ACTIVATION_NAMES = (None, "relu", "gelu", "gelu_tanh", "silu", "relu6", "hardswish", "sigmoid",
                    "hardsigmoid")
# float64 is accepted for gradcheck (through the interpreter on the CPU); it is not a fast path.
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _gemm_launch(a, b, out, bias, residual, pre, activation: str, alpha: float,
                 residual_first: bool = False):
    import triton

    from tilesmith.kernels.gemm import ACTIVATIONS, gemm_kernel
    from tilesmith.kernels.matmul import INTERPRETING

    if bias is not None:  # the kernel reads bias[n] at n (a strided or expanded one: copied)
        bias = bias.contiguous()
    m, k = a.shape
    n = b.shape[1]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    def strides(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    wrap_triton(gemm_kernel)[grid](
        a, b, out, bias if bias is not None else out, residual if residual is not None else out,
        pre if pre is not None else out, m, n, k, alpha,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        *strides(residual), *strides(pre),
        A_K_UNIT=a.stride(1) == 1, B_N_UNIT=b.stride(1) == 1,
        ACTIVATION=ACTIVATIONS[None if activation == "none" else activation],
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RESIDUAL_FIRST=residual_first, STORE_PRE=pre is not None,
        HAS_ALPHA=alpha != 1.0, UPCAST=INTERPRETING, INPUT_PRECISION=dot_precision(a.dtype),
        ACC_DTYPE=_compute_dtype(a.dtype))


def pre_activation_dtype(input_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward keeps the pre-activation in for act': the wider of the inputs'
    and the output's, as eager PyTorch keeps ``act(y.float() + bias)``'s fp32 sum (a bf16
    one would make an fp32 bias gradient as coarse as bf16)."""
    return out_dtype if out_dtype.itemsize > input_dtype.itemsize else input_dtype


def _compute_dtype(dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


@triton_op("tilesmith::gemm_triton", mutates_args=())
def _gemm_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None, activation: str, alpha: float,
                 out_dtype: torch.dtype, save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = a.shape
    n = b.shape[1]
    out = new_output((m, n), like=a, dtype=out_dtype)
    pre = new_output((m, n) if save_pre else (0,), like=a,
                     dtype=pre_activation_dtype(a.dtype, out_dtype))
    if out.numel() == 0:
        return out, pre
    _gemm_launch(a, b, out, bias, residual, pre if save_pre else None, activation, alpha)
    return out, pre


@triton_op("tilesmith::activation_backward_triton", mutates_args=())
def _activation_backward_triton(grad: torch.Tensor, pre: torch.Tensor, activation: str,
                                bias_grad: bool, dz_dtype: torch.dtype
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, bias gradient): dz = grad * act'(pre) in ``dz_dtype`` (the GEMM inputs', which
    pre's may be wider than), and with ``bias_grad`` dz summed over rows (fp32, fp64 for fp64
    inputs) from per-block partial sums of the unrounded products; else empty."""
    import triton

    from tilesmith.kernels.gemm import ACTIVATIONS, activation_backward_kernel
    from tilesmith.kernels.matmul import INTERPRETING

    m, n = pre.shape
    dz = new_output((m, n), like=pre, dtype=dz_dtype)
    sum_dtype = torch.float64 if pre.dtype == torch.float64 else torch.float32
    if dz.numel() == 0:
        return dz, pre.new_zeros((n,) if bias_grad else (0,), dtype=sum_dtype)
    block_m, block_n = (32, 32) if INTERPRETING else (64, 128)
    grid = (triton.cdiv(m, block_m), *spill_grid(triton.cdiv(n, block_n)))
    partials = pre.new_empty((grid[0], n) if bias_grad else (0,), dtype=sum_dtype)
    # Without a bias gradient the kernel never touches partials: dz stands in for the
    # empty tensor (whose null data pointer a GPU launch need not accept).
    wrap_triton(activation_backward_kernel)[grid](
        grad, pre, dz, partials if bias_grad else dz, m, n, grad.stride(0), grad.stride(1),
        pre.stride(0), pre.stride(1), ACTIVATION=ACTIVATIONS[activation], BIAS_GRAD=bias_grad,
        UPCAST=INTERPRETING, COMPUTE_DTYPE=_compute_dtype(pre.dtype), BLOCK_M=block_m,
        BLOCK_N=block_n)
    return dz, partials.sum(0) if bias_grad else partials


@torch.library.register_fake("tilesmith::gemm_cuda")
def _gemm_cuda_fake(a, b, bias, residual, activation, alpha, out_dtype, save_pre):
    m, n = a.shape[0], b.shape[1]
    return (a.new_empty((m, n), dtype=out_dtype),
            a.new_empty((m, n) if save_pre else (0, 0),
                        dtype=pre_activation_dtype(a.dtype, out_dtype)))


@torch.library.register_fake("tilesmith::activation_backward_cuda")
def _activation_backward_cuda_fake(grad, pre, activation, bias_grad, dz_dtype):
    n = pre.shape[1]
    return pre.new_empty(pre.shape, dtype=dz_dtype), pre.new_empty((n,) if bias_grad else (0,),
                                                                   dtype=torch.float32)


def activation_backward(grad: torch.Tensor, pre: torch.Tensor, activation: str,
                        bias_grad: bool, cuda: bool, dz_dtype: torch.dtype | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, bias gradient or empty) for 2-D grad and pre, by the backend that ran forward;
    dz in ``dz_dtype`` (default pre's)."""
    op = (torch.ops.tilesmith.activation_backward_cuda if cuda
          else torch.ops.tilesmith.activation_backward_triton)
    return op(grad, pre, activation, bias_grad, dz_dtype or pre.dtype)


def activation_derivatives(z: torch.Tensor, activation: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(act'(z), act''(z)) as differentiable torch ops, act' as the kernels' activation
    backward computes it (relu's is 1 at a NaN, as torch's threshold_backward)."""
    if activation == "relu":
        return torch.where(z <= 0, 0.0, 1.0).to(z.dtype), torch.zeros_like(z)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.5**0.5))
        pdf = torch.exp(-0.5 * z * z) * (2.0 * torch.pi) ** -0.5
        return cdf + z * pdf, pdf * (2.0 - z * z)
    if activation == "gelu_tanh":
        c, k = (2.0 / torch.pi) ** 0.5, 0.044715
        t = torch.tanh(c * (z + k * z * z * z))
        du = c * (1.0 + 3.0 * k * z * z)  # u = c (z + k z^3): u', u'' = 6 c k z
        sech2 = 1.0 - t * t
        return (0.5 * (1.0 + t) + 0.5 * z * sech2 * du,
                sech2 * (du - z * t * du * du + 3.0 * c * k * z * z))
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s)), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    if activation == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype), torch.zeros_like(z)
    if activation == "hardswish":
        first = torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0))
        second = ((z > -3) & (z < 3)).to(z.dtype) / 3
        return first, second
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s), s * (1.0 - s) * (1.0 - 2.0 * s)
    if activation == "hardsigmoid":
        return ((z > -3) & (z < 3)).to(z.dtype) / 6, torch.zeros_like(z)
    raise ValueError(f"activation_derivatives: unknown activation {activation!r}")


def _activation_backward_setup_context(ctx, inputs, output):
    grad, pre, activation, bias_grad, _dz_dtype = inputs
    ctx.save_for_backward(grad, pre)
    ctx.activation, ctx.bias_grad = activation, bias_grad


def _activation_backward_backward(ctx, grad_dz, grad_sums):
    """The activation backward's own derivative (double backward through a fused
    activation): dz = grad * act'(pre) and the bias gradient sum_rows(dz) give
    d/dgrad = G act'(pre) and d/dpre = G grad act''(pre), G the gradient reaching dz (the
    sums' broadcast over rows included). Torch ops, so differentiable once more."""
    grad, pre = ctx.saved_tensors
    compute = torch.float64 if pre.dtype == torch.float64 else torch.float32
    incoming = grad_dz.to(compute)
    if ctx.bias_grad:
        incoming = incoming + grad_sums.to(compute)
    first, second = activation_derivatives(pre.to(compute), ctx.activation)
    grad_grad = (incoming * first).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_pre = ((incoming * grad.to(compute) * second).to(pre.dtype)
                if ctx.needs_input_grad[1] else None)
    return grad_grad, grad_pre, None, None, None


for _name in ("activation_backward_triton", "activation_backward_cuda"):
    torch.library.register_autograd(f"tilesmith::{_name}", _activation_backward_backward,
                                    setup_context=_activation_backward_setup_context)


def _setup_context(ctx, inputs, output):
    a, b, bias, residual, activation, alpha, out_dtype, save_pre = inputs
    _, pre = output
    # bias only where a double backward computes pre again (below): no other backward reads it.
    ctx.save_for_backward(a, b, bias if activation not in ("none", "relu") else None, pre)
    ctx.activation, ctx.alpha = activation, alpha
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.mark_non_differentiable(pre)


def _make_backward(gemm, cuda: bool):
    def backward(ctx, grad_out, _grad_pre):
        return _backward(ctx, grad_out, gemm, cuda)

    return backward


def _backward(ctx, grad_out, gemm, cuda):
    a, b, bias, pre = ctx.saved_tensors
    if ctx.activation != "none":
        if pre.numel() == 0 and grad_out.numel() != 0:
            raise RuntimeError("gemm: backward through the activation needs the forward's "
                               "pre-activation; call gemm with grad mode enabled")
        if torch.is_grad_enabled() and ctx.activation != "relu":
            # A double backward (create_graph=True): the saved pre-activation is no part of
            # the graph, so it is computed again from a, b and bias (one more GEMM), for
            # the gradient through act'(pre) to reach them (relu's act'' is 0).
            pre = gemm(a, b, bias, None, "none", ctx.alpha, pre.dtype, False)[0]
        dz, dz_column_sums = activation_backward(grad_out, pre, ctx.activation,
                                                 ctx.needs_input_grad[2], cuda, a.dtype)
    else:
        dz = grad_out.to(a.dtype)
        dz_column_sums = None
    grad_a = grad_b = grad_bias = grad_residual = None
    if ctx.needs_input_grad[0]:
        grad_a = gemm(dz, b.t(), None, None, "none", ctx.alpha, a.dtype, False)[0]
    if ctx.needs_input_grad[1]:
        grad_b = gemm(a.t(), dz, None, None, "none", ctx.alpha, b.dtype, False)[0]
    if ctx.needs_input_grad[2]:
        if dz_column_sums is None:
            dz_column_sums = grad_out.sum(0, dtype=torch.float64 if grad_out.dtype ==
                                          torch.float64 else torch.float32)
        grad_bias = dz_column_sums.to(ctx.bias_dtype)
    if ctx.needs_input_grad[3]:
        grad_residual = grad_out.to(ctx.residual_dtype)
    return grad_a, grad_b, grad_bias, grad_residual, None, None, None, None


torch.library.register_autograd("tilesmith::gemm_triton",
                                _make_backward(torch.ops.tilesmith.gemm_triton, cuda=False),
                                setup_context=_setup_context)
torch.library.register_autograd("tilesmith::gemm_cuda",
                                _make_backward(torch.ops.tilesmith.gemm_cuda, cuda=True),
                                setup_context=_setup_context)


# Each epilogue activation as torch's eager op.
_TORCH_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "relu6": F.relu6,
                      "hardswish": F.hardswish, "sigmoid": torch.sigmoid,
                      "hardsigmoid": F.hardsigmoid,
                      "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


def torch_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation`` (one of ACTIVATION_NAMES, or "none") as torch's eager op."""
    function = _TORCH_ACTIVATIONS.get(activation)
    return y if function is None else function(y)


def _torch_gemm(a, b, bias, residual, activation, alpha, out_dtype):
    """The torch backend and benchmark baseline: cuBLAS, then the epilogue as eager ops."""
    if out_dtype.itemsize > a.dtype.itemsize:
        a, b = a.to(out_dtype), b.to(out_dtype)  # a wider output: compute in it, as ours
    if bias is not None:  # one addmm, as F.linear: cuBLASLt adds the bias in its epilogue
        y = torch.addmm(bias if bias.dtype == a.dtype else bias.to(a.dtype), a, b, alpha=alpha)
    else:
        y = torch.matmul(a, b)
        if alpha != 1.0:
            y = y * alpha
    y = torch_activation(y, activation)
    if residual is not None:
        y = y + (residual if residual.dtype == y.dtype else residual.to(y.dtype))
    # (A .to() that changes nothing still costs a dispatch: this is every call's path on
    # the CPU.)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def gemm(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None,
         activation: str | None = None, residual: torch.Tensor | None = None,
         alpha: float = 1.0, out_dtype: torch.dtype | None = None,
         backend: str | None = None) -> torch.Tensor:
    """``activation(alpha * (a @ b) + bias) + residual`` for 2-D a (M, K) and b (K, N), any
    strides (all four transpose combinations without copies). fp16/bf16 (or fp32) inputs,
    fp32 accumulation, output ``out_dtype`` (fp16, bf16 or fp32; default a's dtype).
    ``activation``: None, "relu", "gelu", "gelu_tanh", "silu", "relu6", "hardswish",
    "sigmoid" or "hardsigmoid".
    ``bias``: (N,).
    ``residual``: (M, N). Differentiable in a, b, bias and residual, twice (create_graph)."""
    fn = "gemm"
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        a, b, bias, residual = autocast_inputs(a, b, bias, residual)
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got "
                            f"{t.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(f"{fn}: a and b must have one dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: a is on {a.device}, b on {b.device}")
    m, k = a.shape
    if b.shape[0] != k:
        raise ValueError(f"{fn}: inner dimensions differ: a {tuple(a.shape)} @ b "
                         f"{tuple(b.shape)}")
    n = b.shape[1]
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATION_NAMES}, got "
                         f"{activation!r}")
    out_dtype = a.dtype if out_dtype is None else out_dtype
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be float16, bfloat16, float32 or float64, got "
                        f"{out_dtype}")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        raise TypeError(f"{fn}: alpha must be a real number, got {type(alpha).__name__}")
    for name, t, shape in (("bias", bias, (n,)), ("residual", residual, (m, n))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape} for a {tuple(a.shape)} @ "
                             f"b {tuple(b.shape)}, got {tuple(t.shape)}")
        if t.device != a.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, a on {a.device}")

    name = _backend.pick("gemm", a, backend)
    if name == "torch":
        return _torch_gemm(a, b, bias, residual, activation, float(alpha), out_dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (a, b, bias, residual))
    if name == "cuda" and out_dtype not in (a.dtype, torch.float32):
        raise _backend.BackendUnavailableError(
            f"{fn}: the cuda backend writes the input dtype or float32, not {out_dtype}")
    op = torch.ops.tilesmith.gemm_cuda if name == "cuda" else torch.ops.tilesmith.gemm_triton
    out, _ = op(a, b, bias, residual, activation or "none", float(alpha), out_dtype,
                bool(activation is not None and needs_grad))
    return out

register_autocast("gemm_triton")
register_autocast("gemm_cuda")

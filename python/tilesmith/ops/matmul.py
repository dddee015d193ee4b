"""matmul: ``torch.matmul`` semantics on tilesmith's kernels.

Three layers:
  * ``matmul(a, b, *, backend=None)``: the public function. Validates, applies torch.matmul's
    rank rules (1-D operands, broadcast batch dimensions) with views where it can, and
    dispatches to one backend.
  * ``tilesmith::matmul_cuda`` / ``tilesmith::matmul_triton``: registered ops on same-rank
    2-D or 3-D operands (3-D batch strides may be 0: broadcast without a copy). Each has a
    fake kernel and an autograd rule whose backward calls the same registered op, so
    torch.compile traces forward and backward.
  * kernels: csrc/matmul/ (bound in csrc/registration.cpp) and kernels/matmul.py.
"""

from __future__ import annotations

import math

import torch
from torch.library import triton_op

from ._library import (LIBRARY, autocast_inputs, dot_precision, new_output, register_autocast,
                       spill_grid, wrap_triton)

LIBRARY.define("matmul_cuda(Tensor a, Tensor b) -> Tensor")

from .. import backend as _backend  # noqa: E402  (loads tilesmith._C after the schema)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _output_shape(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    return (*a.shape[:-1], b.shape[-1])


@torch.library.register_fake("tilesmith::matmul_cuda")
def _matmul_cuda_fake(a, b):
    return a.new_empty(_output_shape(a, b))


def triton_launch_args(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """(grid, positional args, constexpr kwargs) for kernels/matmul.py's kernel writing
    ``c = a @ b``; shared by the op and by the test that runs every autotune config."""
    import triton
    import triton.language as tl

    from tilesmith.kernels.matmul import INTERPRETING

    batched = a.dim() == 3
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = a.shape[0] if batched else 1
    # A 2-D call is a batch of one.
    za, zb, zc = (a.stride(0), b.stride(0), c.stride(0)) if batched else (0, 0, 0)
    acc_dtype = tl.float64 if a.dtype == torch.float64 else tl.float32

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
                *spill_grid(batch))

    args = (a, b, c, m, n, k, batch,
            za, a.stride(-2), a.stride(-1),
            zb, b.stride(-2), b.stride(-1),
            zc, c.stride(-2), c.stride(-1))
    constexprs = dict(A_K_UNIT=a.stride(-1) == 1, B_N_UNIT=b.stride(-1) == 1,
                      UPCAST=INTERPRETING, INPUT_PRECISION=dot_precision(a.dtype),
                      ACC_DTYPE=acc_dtype)
    return grid, args, constexprs


@triton_op("tilesmith::matmul_triton", mutates_args=())
def _matmul_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from tilesmith.kernels.matmul import matmul_kernel

    c = new_output(_output_shape(a, b), like=a)
    if c.numel() == 0:
        return c
    if a.shape[-1] == 0:
        return c.zero_()
    grid, args, constexprs = triton_launch_args(a, b, c)
    wrap_triton(matmul_kernel)[grid](*args, **constexprs)
    return c


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_backward(op):
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        # d(a @ b) = grad @ b^T and a^T @ grad: transposed views, which the kernels read
        # in place.
        if ctx.needs_input_grad[0]:
            grad_a = op(grad, b.transpose(-1, -2))
        if ctx.needs_input_grad[1]:
            grad_b = op(a.transpose(-1, -2), grad)
        return grad_a, grad_b

    return backward


torch.library.register_autograd("tilesmith::matmul_cuda",
                                _make_backward(torch.ops.tilesmith.matmul_cuda),
                                setup_context=_setup_context)
torch.library.register_autograd("tilesmith::matmul_triton",
                                _make_backward(torch.ops.tilesmith.matmul_triton),
                                setup_context=_setup_context)

_OPS = {"cuda": torch.ops.tilesmith.matmul_cuda, "triton": torch.ops.tilesmith.matmul_triton}


def _check(a, b) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"matmul: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"matmul: {name} must have at least 1 dimension, got a 0-d tensor")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"matmul: {name} must be float16, bfloat16, float32 or float64, got "
                            f"{t.dtype} (shape {tuple(t.shape)})")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: a and b must have the same dtype, got a {a.dtype} "
                        f"{tuple(a.shape)} and b {b.dtype} {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"matmul: a and b must be on the same device, got a on {a.device} and "
                         f"b on {b.device}")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.dim() == 1 else b.shape[-2]
    if k_a != k_b:
        raise ValueError(f"matmul: inner dimensions differ: a {tuple(a.shape)} @ b "
                         f"{tuple(b.shape)} ({k_a} != {k_b})")
    if a.dim() <= 2 or b.dim() <= 2:  # no batch dimensions to broadcast (and a cheap check)
        return
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"matmul: batch dimensions do not broadcast: a {tuple(a.shape)} @ b "
                         f"{tuple(b.shape)}") from None


def matmul(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``torch.matmul(a, b)`` on the chosen backend (see ``tilesmith.backend``): 1-D operands,
    2-D, and batched operands whose batch dimensions broadcast. fp16/bf16 accumulate in fp32;
    fp32 follows ``torch.set_float32_matmul_precision`` (IEEE by default, TF32 when allowed)
    on the triton backend; the cuda backend takes fp16/bf16 only. Differentiable in a and b, twice.
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        a, b = autocast_inputs(a, b)
    _check(a, b)
    name = _backend.pick("matmul", a, backend)
    if name == "torch":
        return torch.matmul(a, b)
    op = _OPS[name]

    squeeze_rows = a.dim() == 1
    squeeze_cols = b.dim() == 1
    if squeeze_rows:
        a = a.unsqueeze(0)
    if squeeze_cols:
        b = b.unsqueeze(-1)

    if a.dim() == 2 and b.dim() == 2:
        out = op(a, b)
    elif b.dim() == 2:
        # (..., m, k) @ (k, n): fold the batch into rows when that is a view (the common
        # Linear-layer case), otherwise run a batch whose b has batch stride 0.
        batch_shape = a.shape[:-2]
        # Sizes spelled out, not -1, which a zero-size tensor leaves ambiguous.
        try:
            folded = a.view(math.prod(a.shape[:-1]), a.shape[-1])
            out = op(folded, b).view(*batch_shape, a.shape[-2], b.shape[-1])
        except RuntimeError:
            flat = a.reshape(math.prod(batch_shape), *a.shape[-2:])
            out = op(flat, b.expand(flat.shape[0], *b.shape)).view(*batch_shape, a.shape[-2],
                                                                   b.shape[-1])
    else:
        batch_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = _as_batch(a, batch_shape)
        b3 = _as_batch(b, batch_shape)
        out = op(a3, b3).view(*batch_shape, a.shape[-2], b.shape[-1])

    if squeeze_rows:
        out = out.squeeze(-2)
    if squeeze_cols:
        out = out.squeeze(-1)
    return out


def _as_batch(t: torch.Tensor, batch_shape) -> torch.Tensor:
    """``t`` broadcast to ``batch_shape`` and flattened to one batch dimension: a view (batch
    stride 0 where broadcast) when the strides allow, else a copy."""
    expanded = t.expand(*batch_shape, *t.shape[-2:])
    if len(batch_shape) == 0:
        return expanded.unsqueeze(0)
    if len(batch_shape) == 1:
        return expanded
    return expanded.reshape(math.prod(batch_shape), *t.shape[-2:])

register_autocast("matmul_cuda")
register_autocast("matmul_triton")

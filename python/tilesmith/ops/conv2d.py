"""conv2d: ``torch.nn.functional.conv2d`` semantics plus a fused epilogue, ``activation(conv +
bias + residual)``, on implicit-GEMM kernels (forward, dgrad, wgrad).

Layers: ``conv2d`` (validation, padding="same"/"valid", backend choice) ->
``tilesmith::conv2d_fwd_{triton,cuda}`` (also stores the pre-activation when a backward will
need it), ``tilesmith::conv2d_{dgrad,wgrad}_{triton,cuda}`` and, through a fused activation,
its derivative -> kernels/conv2d.py (Triton: groups, any channel count, fp32) or
csrc/conv2d/ (CUDA: fp16/bf16, channel and filter counts per group multiples of 8, or
depthwise with a multiple of 8 channels, other counts zero-filled up to those here;
channels-last, NCHW tensors are copied). A 1x1
convolution with stride 1, no padding and one group is a GEMM over the pixels: the gemm
kernels take it (triton: forward and dgrad of channels-last inputs; cuda: all three passes,
in csrc/conv2d/conv2d_api.cpp). The ops' outputs and input gradients keep their input's
memory format (NCHW or channels_last); ``conv2d`` first makes the input channels-last where
PyTorch's output would be (a channels-last weight), so the output's format is PyTorch's.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch.library import triton_op

from ._library import (LIBRARY, MAX_GRID_YZ, autocast_inputs, dot_precision, new_output,
                       register_autocast, wrap_triton)

LIBRARY.define("conv2d_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, "
               "int[] stride, int[] padding, int[] dilation, str activation, bool save_pre) "
               "-> (Tensor, Tensor)")
LIBRARY.define("conv2d_dgrad_cuda(Tensor grad, Tensor weight, int[] input_shape, int[] stride, "
               "int[] padding, int[] dilation, bool channels_last) -> Tensor")
LIBRARY.define("conv2d_wgrad_cuda(Tensor grad, Tensor x, int[] weight_shape, int[] stride, "
               "int[] padding, int[] dilation) -> Tensor")

from .. import backend as _backend  # noqa: E402  (loads tilesmith._C after the schemas)
from .gemm import activation_backward, torch_activation  # noqa: E402

ACTIVATION_NAMES = (None, "relu", "gelu", "silu", "relu6", "hardswish", "sigmoid",
                    "hardsigmoid")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_channels_last(t: torch.Tensor) -> bool:
    """Laid out channels-last: contiguous that way, and for a tensor contiguous both ways
    (one channel, or 1x1 pixels), with the strides PyTorch reads as channels-last."""
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and suggest_memory_format(t) == torch.channels_last)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format a tensor is laid out in, by _is_channels_last."""
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


def _output_channels_last(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """PyTorch's choice of a convolution's output format: channels-last when the input's or
    the weight's strides are channels-last-like (Tensor.suggest_memory_format), so also for
    an NCHW input with a channels-last weight, and for a one-channel input (contiguous both
    ways) whose strides lean channels-last."""
    return any(suggest_memory_format(t) == torch.channels_last for t in (input, weight))


def _empty_like_format(shape, like, channels_last, dtype=None):
    """An output with the strides torch.empty gives that memory format, also where the two
    formats coincide (one channel, or 1x1 pixels): those strides are what suggest_memory_format
    reads (the format of the convolutions that follow), and what the cuda ops' C++ returns,
    which their fake implementations must match."""
    return new_output(shape, like=like, dtype=dtype, memory_format=torch.channels_last
                      if channels_last else torch.contiguous_format)


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _constexprs(x):
    import triton.language as tl

    from tilesmith.kernels.matmul import INTERPRETING

    return dict(UPCAST=INTERPRETING, INPUT_PRECISION=dot_precision(x.dtype),
                ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32)


def _blocks(m, n):
    from tilesmith.kernels.matmul import INTERPRETING

    if INTERPRETING:
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
    # First choices for H100, to be tuned from bench/results. A tile 128 columns wide takes
    # 8 warps: at 4, ptxas spills the gathered addresses (tools/compile_kernels.py).
    block_n = 128 if n > 64 else 64 if n > 32 else 32 if n > 16 else 16
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=32, GROUP_M=8,
                num_warps=8 if block_n == 128 else 4, num_stages=3)


def _out_size(size, pad, dil, kernel, stride):
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def _is_depthwise(groups, channels, filters):
    """One filter per channel: the direct Triton kernels (kernels/conv2d.py) take it."""
    return groups == channels == filters and groups > 1


def _is_pointwise(weight_shape, stride, padding, groups):
    """1x1, stride 1, no padding, one group: a GEMM over the pixels (dilation is moot)."""
    return (tuple(weight_shape[2:]) == (1, 1) and tuple(stride) == (1, 1)
            and tuple(padding) == (0, 0) and groups == 1)


def _pixels(t):
    """A channels-last (N, C, H, W) tensor as its (N*H*W, C) matrix of pixels: a view."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n * h * w, c)


def _depthwise_blocks(channels, elements=4096):
    from tilesmith.kernels.matmul import INTERPRETING

    if INTERPRETING:
        return dict(BLOCK_M=16, BLOCK_C=16)
    # First choices (pixels x channels, `elements` a program), to be tuned on a GPU. 16
    # elements a thread: at 32 (4096 on 4 warps) Triton 3.6 spilled the bf16 forward of
    # 16-channel blocks on sm_80 (tools/compile_kernels.py).
    block_c = min(64, max(16, 1 << (channels - 1).bit_length()))
    return dict(BLOCK_M=elements // block_c, BLOCK_C=block_c, num_warps=elements // 512)


def _acc_dtype(x):
    import triton.language as tl

    return tl.float64 if x.dtype == torch.float64 else tl.float32


@triton_op("tilesmith::conv2d_fwd_triton", mutates_args=())
def _conv2d_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, stride: list[int], padding: list[int],
                       dilation: list[int], groups: int, activation: str,
                       save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    from tilesmith.kernels.conv2d import conv2d_fwd_kernel
    from tilesmith.kernels.gemm import ACTIVATIONS

    n, c, h, w = x.shape
    k, c_group, r, s = weight.shape
    p = _out_size(h, padding[0], dilation[0], r, stride[0])
    q = _out_size(w, padding[1], dilation[1], s, stride[1])
    if bias is not None:  # the kernels read bias[k] at k (a strided or expanded one: copied)
        bias = bias.contiguous()
    channels_last = _is_channels_last(x)
    out = _empty_like_format((n, k, p, q), x, channels_last)
    pre = _empty_like_format((n, k, p, q) if save_pre else (0, 0, 0, 0), x, channels_last)
    if out.numel() == 0:
        return out, pre
    # The kernels read the residual through its own strides (any layout).
    residual_strides = _strides4(residual) if residual is not None else (0, 0, 0, 0)
    epilogue = dict(ACTIVATION=ACTIVATIONS[None if activation == "none" else activation],
                    HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                    STORE_PRE=save_pre)
    if _is_depthwise(groups, c, k):
        from tilesmith.kernels.conv2d import depthwise_fwd_kernel
        from tilesmith.kernels.matmul import INTERPRETING

        blocks = _depthwise_blocks(c)
        grid = (triton.cdiv(n * p * q, blocks["BLOCK_M"]), triton.cdiv(c, blocks["BLOCK_C"]))
        wrap_triton(depthwise_fwd_kernel)[grid](
            x, weight, bias if bias is not None else out,
            residual if residual is not None else out, out, pre if save_pre else out,
            n, c, h, w, p, q, r, s, *stride, *padding, *dilation, *_strides4(x),
            weight.stride(0), weight.stride(2), weight.stride(3), *_strides4(out),
            *residual_strides, UPCAST=INTERPRETING, ACC_DTYPE=_acc_dtype(x), **epilogue,
            **blocks)
        return out, pre
    if channels_last and _is_pointwise(weight.shape, stride, padding, groups):
        # The channels-last pixels times the weight seen as (C, K): the gemm kernel, its
        # tiles autotuned on the shape, with the same epilogue.
        from .gemm import _gemm_launch

        _gemm_launch(_pixels(x), weight.reshape(k, c).t(), _pixels(out), bias,
                     residual.permute(0, 2, 3, 1).reshape(n * p * q, k)
                     if residual is not None else None,
                     _pixels(pre) if save_pre else None, activation, 1.0, residual_first=True)
        return out, pre
    blocks = _blocks(n * p * q, k // groups)
    grid = (triton.cdiv(n * p * q, blocks["BLOCK_M"]) * triton.cdiv(k // groups,
                                                                    blocks["BLOCK_N"]), groups)
    wrap_triton(conv2d_fwd_kernel)[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        out, pre if save_pre else out,
        n, h, w, p, q, r, s, c_group, k // groups, *stride, *padding, *dilation,
        *_strides4(x), *_strides4(weight), *_strides4(out), *residual_strides,
        **epilogue, **_constexprs(x), **blocks)
    return out, pre


@triton_op("tilesmith::conv2d_dgrad_triton", mutates_args=())
def _conv2d_dgrad_triton(grad: torch.Tensor, weight: torch.Tensor, input_shape: list[int],
                         stride: list[int], padding: list[int], dilation: list[int],
                         groups: int, channels_last: bool) -> torch.Tensor:
    import triton

    from tilesmith.kernels.conv2d import conv2d_dgrad_kernel

    n, c, h, w = input_shape
    k, c_group, r, s = weight.shape
    p, q = grad.shape[2], grad.shape[3]
    dx = _empty_like_format((n, c, h, w), weight, channels_last)
    if dx.numel() == 0:
        return dx
    if grad.numel() == 0:
        return dx.zero_()
    if _is_depthwise(groups, c, k):
        from tilesmith.kernels.conv2d import depthwise_dgrad_kernel
        from tilesmith.kernels.matmul import INTERPRETING

        # Half the forward's tile: at 4096 elements ptxas spills the per-tap phase checks
        # (tools/compile_kernels.py).
        blocks = _depthwise_blocks(c, elements=2048)
        grid = (triton.cdiv(n * h * w, blocks["BLOCK_M"]), triton.cdiv(c, blocks["BLOCK_C"]))
        wrap_triton(depthwise_dgrad_kernel)[grid](
            grad, weight, dx, n, c, h, w, p, q, r, s, *stride, *padding, *dilation,
            *_strides4(grad), weight.stride(0), weight.stride(2), weight.stride(3),
            *_strides4(dx), UPCAST=INTERPRETING, ACC_DTYPE=_acc_dtype(weight), **blocks)
        return dx
    if channels_last and _is_pointwise(weight.shape, stride, padding, groups):
        # dx's pixels = grad's pixels (N*H*W, K) times the (K, C) weight: the gemm kernel.
        from .gemm import _gemm_launch

        pixels = grad.contiguous(memory_format=torch.channels_last)
        _gemm_launch(_pixels(pixels), weight.reshape(k, c), _pixels(dx), None, None, None,
                     "none", 1.0)
        return dx
    # One GEMM per phase of the stride (kernels/conv2d.py); the grid fits the largest.
    phases = stride[0] * stride[1]
    if phases > MAX_GRID_YZ:
        raise ValueError(f"conv2d dgrad on the triton backend takes stride_h * stride_w up to "
                         f"{MAX_GRID_YZ} (a grid slice per phase of the stride), got stride "
                         f"{stride}")
    rows = n * triton.cdiv(h, stride[0]) * triton.cdiv(w, stride[1])
    blocks = _blocks(rows, c_group)
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]) * triton.cdiv(c_group, blocks["BLOCK_N"]),
            groups, phases)
    # Taps that reach one phase lie stride / gcd(dilation, stride) apart along each axis.
    steps = [st // math.gcd(d, st) for st, d in zip(stride, dilation)]
    wrap_triton(conv2d_dgrad_kernel)[grid](
        grad, weight, dx, n, h, w, p, q, r, s, c_group, k // groups, *stride, *padding,
        *dilation, *steps, *_strides4(grad), *_strides4(weight), *_strides4(dx),
        TAPS_PAD=triton.next_power_of_2(max(r, s)), **_constexprs(weight), **blocks)
    return dx


@triton_op("tilesmith::conv2d_wgrad_triton", mutates_args=())
def _conv2d_wgrad_triton(grad: torch.Tensor, x: torch.Tensor, weight_shape: list[int],
                         stride: list[int], padding: list[int], dilation: list[int],
                         groups: int) -> torch.Tensor:
    import triton

    from tilesmith.kernels.conv2d import conv2d_wgrad_kernel
    from tilesmith.kernels.matmul import INTERPRETING

    k, c_group, r, s = weight_shape
    n, c, h, w = x.shape
    p, q = grad.shape[2], grad.shape[3]
    total = n * p * q
    if _is_depthwise(groups, c, k):
        return _depthwise_wgrad(grad, x, weight_shape, stride, padding, dilation)
    blocks = _blocks(k // groups, c_group * r * s)
    blocks.update(BLOCK_M=16 if INTERPRETING else 64)
    tiles = triton.cdiv(k // groups, blocks["BLOCK_M"]) * triton.cdiv(c_group * r * s,
                                                                      blocks["BLOCK_N"])
    # Split the N*P*Q reduction when the weight alone gives too few programs to fill the GPU:
    # aim at ~4 programs per SM (132 on an H100), each with at least 8 K-steps of work.
    target_programs = 4 if INTERPRETING else 528
    splits = max(1, min(target_programs // max(tiles * groups, 1),
                        total // (8 * blocks["BLOCK_K"]) or 1))
    chunk = triton.cdiv(triton.cdiv(total, splits), blocks["BLOCK_K"]) * blocks["BLOCK_K"]
    splits = triton.cdiv(total, chunk) if total else 1
    partial = torch.zeros((splits, k, c_group * r * s), dtype=torch.float32 if
                          x.dtype != torch.float64 else torch.float64, device=x.device)
    if total and partial.numel():
        wrap_triton(conv2d_wgrad_kernel)[(tiles, groups, splits)](
            grad, x, partial, n, h, w, p, q, r, s, c_group, k // groups, chunk, *stride,
            *padding, *dilation, *_strides4(grad), *_strides4(x), **_constexprs(x), **blocks)
    # Splits are summed in a fixed order: the weight gradient is deterministic.
    return partial.sum(0).view(k, c_group, r, s).to(x.dtype)


def _depthwise_wgrad(grad, x, weight_shape, stride, padding, dilation):
    """(C, 1, R, S): one program per (pixel chunk, channel block, tap), fp32 partial sums per
    chunk added in a fixed order (deterministic)."""
    import triton

    from tilesmith.kernels.conv2d import depthwise_wgrad_kernel
    from tilesmith.kernels.matmul import INTERPRETING

    c, _, r, s = weight_shape
    n, _, h, w = x.shape
    p, q = grad.shape[2], grad.shape[3]
    total = n * p * q
    blocks = _depthwise_blocks(c)
    programs = triton.cdiv(c, blocks["BLOCK_C"]) * r * s
    # Split the pixels when channels x taps alone give too few programs (~4 per SM on an
    # H100), each split at least 4 tiles of pixels.
    target_programs = 4 if INTERPRETING else 528
    splits = max(1, min(target_programs // programs, total // (4 * blocks["BLOCK_M"]) or 1))
    chunk = triton.cdiv(triton.cdiv(total, splits), blocks["BLOCK_M"]) * blocks["BLOCK_M"]
    splits = triton.cdiv(total, chunk) if total else 1
    partial = torch.zeros((splits, r * s, c), dtype=torch.float64 if x.dtype == torch.float64
                          else torch.float32, device=x.device)
    if total:
        wrap_triton(depthwise_wgrad_kernel)[(splits, triton.cdiv(c, blocks["BLOCK_C"]), r * s)](
            grad, x, partial, n, c, h, w, p, q, r, s, chunk, *stride, *padding, *dilation,
            *_strides4(grad), *_strides4(x), ACC_DTYPE=_acc_dtype(x), **blocks)
    return partial.sum(0).t().reshape(c, 1, r, s).to(x.dtype)


def _out_shape(x, weight, stride, padding, dilation):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    return (n, k, _out_size(h, padding[0], dilation[0], r, stride[0]),
            _out_size(w, padding[1], dilation[1], s, stride[1]))


@torch.library.register_fake("tilesmith::conv2d_fwd_cuda")
def _conv2d_fwd_cuda_fake(x, weight, bias, residual, stride, padding, dilation, activation,
                          save_pre):
    shape = _out_shape(x, weight, stride, padding, dilation)
    channels_last = _is_channels_last(x)
    return (_empty_like_format(shape, x, channels_last),
            _empty_like_format(shape if save_pre else (0, 0, 0, 0), x, channels_last))


@torch.library.register_fake("tilesmith::conv2d_dgrad_cuda")
def _conv2d_dgrad_cuda_fake(grad, weight, input_shape, stride, padding, dilation,
                            channels_last):
    return _empty_like_format(tuple(input_shape), grad, channels_last)


@torch.library.register_fake("tilesmith::conv2d_wgrad_cuda")
def _conv2d_wgrad_cuda_fake(grad, x, weight_shape, stride, padding, dilation):
    return _empty_like_format(tuple(weight_shape), x, True)


def _setup_context(ctx, inputs, output, cuda=False):
    if cuda:  # conv2d_fwd_cuda reads the groups off the weight's shape
        x, weight, bias, residual, stride, padding, dilation, activation, save_pre = inputs
        groups = x.shape[1] // weight.shape[1]
    else:
        x, weight, bias, residual, stride, padding, dilation, groups, activation, save_pre = inputs
    _, pre = output
    # bias and residual only where a double backward computes pre again (_backward): no
    # other pass reads them.
    recomputes_pre = activation not in ("none", "relu")
    ctx.save_for_backward(x, weight, bias if recomputes_pre else None,
                          residual if recomputes_pre else None, pre)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    # The input gradient's format: PyTorch's, the forward output's (also for an input that
    # is contiguous both ways, or an NCHW one with a channels-last weight).
    ctx.channels_last = _output_channels_last(x, weight)
    ctx.cuda = cuda
    ctx.mark_non_differentiable(pre)


def _cuda_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output, cuda=True)


def _backward(ctx, grad_out, _grad_pre):
    x, weight, bias, residual, pre = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    if ctx.activation != "none" and pre.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError("conv2d: backward through the activation needs the forward's "
                           "pre-activation; call conv2d with grad mode enabled")
    if ctx.activation not in ("none", "relu") and torch.is_grad_enabled():
        # A double backward (create_graph=True): the saved pre-activation is no part of the
        # graph, so it is computed again (one more forward convolution), for the gradient
        # through act'(pre) to reach x, weight and bias (relu's act'' is 0).
        pre = _forward_op(ctx.cuda)(x, weight, bias, residual, stride, padding, dilation,
                                    *(() if ctx.cuda else (groups,)), "none", False)[0]
    dz_channel_sums = None  # the bias gradient, where the activation backward reduces it
    if ctx.activation != "none":
        # The elementwise kernels are 2-D: rows of channels (NHWC order), or for the Triton
        # backend on NCHW, rows of pixels (the bias gradient then left to torch). The cuda
        # backend computes in channels-last whatever the input's format, so it always takes
        # rows of channels and its dgrad and wgrad then read dz without copying it.
        by_channel = ctx.channels_last or ctx.cuda
        memory_format = torch.channels_last if by_channel else torch.contiguous_format
        g = grad_out.contiguous(memory_format=memory_format)
        pre = pre.contiguous(memory_format=memory_format)
        n, k, p, q = g.shape
        if by_channel:
            rows = lambda t: t.permute(0, 2, 3, 1).reshape(n * p * q, k)  # noqa: E731
        else:
            rows = lambda t: t.reshape(n * k * p, q)  # noqa: E731
        reduce_bias = by_channel and ctx.has_bias and ctx.needs_input_grad[2]
        dz2, sums = activation_backward(rows(g), rows(pre), ctx.activation, reduce_bias,
                                        ctx.cuda)
        dz = dz2.view(n, p, q, k).permute(0, 3, 1, 2) if by_channel else dz2.view(g.shape)
        if reduce_bias:
            dz_channel_sums = sums
    else:
        dz = grad_out
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        if ctx.cuda:
            grad_x = torch.ops.tilesmith.conv2d_dgrad_cuda(dz, weight, list(x.shape), stride,
                                                           padding, dilation, ctx.channels_last)
        else:
            grad_x = torch.ops.tilesmith.conv2d_dgrad_triton(dz, weight, list(x.shape), stride,
                                                             padding, dilation, groups,
                                                             ctx.channels_last)
    if ctx.needs_input_grad[1]:
        if ctx.cuda:
            grad_w = torch.ops.tilesmith.conv2d_wgrad_cuda(dz, x, list(weight.shape), stride,
                                                           padding, dilation)
        else:
            grad_w = torch.ops.tilesmith.conv2d_wgrad_triton(dz, x, list(weight.shape), stride,
                                                             padding, dilation, groups)
        grad_w = grad_w.contiguous(memory_format=_format_of(weight))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        if dz_channel_sums is None:
            dz_channel_sums = dz.sum((0, 2, 3), dtype=torch.float32 if dz.dtype !=
                                     torch.float64 else torch.float64)
        grad_b = dz_channel_sums.to(weight.dtype)
    # The residual is added before the activation: its gradient is dz.
    grad_residual = dz if ctx.needs_input_grad[3] else None
    rest = (None,) * (5 if ctx.cuda else 6)  # stride .. save_pre
    return grad_x, grad_w, grad_b, grad_residual, *rest


torch.library.register_autograd("tilesmith::conv2d_fwd_triton", _backward,
                                setup_context=_setup_context)
torch.library.register_autograd("tilesmith::conv2d_fwd_cuda", _backward,
                                setup_context=_cuda_setup_context)


# The backward's own derivatives (double backward, e.g. a gradient penalty). dgrad and wgrad
# are linear in each of their tensors, so each one's derivative is one of the three
# convolutions: dgrad(grad, weight) -> (forward(g, weight), wgrad(grad, g)), and
# wgrad(grad, x) -> (forward(x, g), dgrad(grad, g)), g the gradient reaching the result.

def _forward_op(cuda):
    return torch.ops.tilesmith.conv2d_fwd_cuda if cuda else torch.ops.tilesmith.conv2d_fwd_triton


def _pass_setup_context(ctx, inputs, output, cuda):
    grad, operand = inputs[:2]
    ctx.save_for_backward(grad, operand)
    ctx.conv = list(inputs[3:6])  # stride, padding, dilation
    ctx.groups = () if cuda else (inputs[6],)  # the cuda ops read it off the shapes
    ctx.cuda = cuda


def _dgrad_backward(ctx, grad_dx):
    grad, weight = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = _forward_op(ctx.cuda)(grad_dx, weight, None, None, *ctx.conv, *ctx.groups,
                                       "none", False)[0]
    if ctx.needs_input_grad[1]:
        wgrad = (torch.ops.tilesmith.conv2d_wgrad_cuda if ctx.cuda
                 else torch.ops.tilesmith.conv2d_wgrad_triton)
        d_weight = wgrad(grad, grad_dx, list(weight.shape), *ctx.conv, *ctx.groups)
    return d_grad, d_weight, *(None,) * (5 if ctx.cuda else 6)


def _wgrad_backward(ctx, grad_dw):
    grad, x = ctx.saved_tensors
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad = _forward_op(ctx.cuda)(x, grad_dw, None, None, *ctx.conv, *ctx.groups,
                                       "none", False)[0]
    if ctx.needs_input_grad[1]:
        dgrad = (torch.ops.tilesmith.conv2d_dgrad_cuda if ctx.cuda
                 else torch.ops.tilesmith.conv2d_dgrad_triton)
        d_x = dgrad(grad, grad_dw, list(x.shape), *ctx.conv, *ctx.groups, _is_channels_last(x))
    return d_grad, d_x, *(None,) * (4 if ctx.cuda else 5)


for _cuda, _suffix in ((False, "triton"), (True, "cuda")):
    _setup = functools.partial(_pass_setup_context, cuda=_cuda)
    torch.library.register_autograd(f"tilesmith::conv2d_dgrad_{_suffix}", _dgrad_backward,
                                    setup_context=_setup)
    torch.library.register_autograd(f"tilesmith::conv2d_wgrad_{_suffix}", _wgrad_backward,
                                    setup_context=_setup)


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return list(value)
    raise TypeError(f"conv2d: {name} must be an int or a pair of ints, got {value!r}")


def _torch_conv2d(x, weight, bias, stride, padding, dilation, groups, activation, residual=None):
    """The torch backend and benchmark baseline: cuDNN, then the residual sum and the
    activation as eager ops. A bias of another float dtype is cast to x's, which F.conv2d
    requires (the kernels add any float bias in fp32)."""
    if bias is not None and bias.dtype != x.dtype:  # (a .to() that changes nothing costs too)
        bias = bias.to(x.dtype)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return torch_activation(y, activation)


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, activation: str | None = None,
           residual: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``activation(torch.nn.functional.conv2d(input, weight, bias, stride, padding,
    dilation, groups) + residual)`` in one kernel: ``activation`` None, "relu", "gelu",
    "silu", "relu6", "hardswish", "sigmoid" or "hardsigmoid"; ``residual`` None or a
    tensor of the output's shape and input's dtype, added before the activation, as a
    ResNet block adds its shortcut (``relu(bn(conv(x)) + identity)``, cuDNN's fused
    convolution's z; tilesmith's ``gemm`` adds its residual after the activation, where a
    Transformer's sits). input is (N, C, H, W) in NCHW or channels_last, or unbatched (C,
    H, W); weight (K, C/groups, R, S); the output's memory format is PyTorch's:
    channels_last when the input or the weight is. padding: int, pair, "valid" or "same"
    (stride 1 only, as in PyTorch). Differentiable in input, weight, bias and residual,
    through the activation, twice (create_graph)."""
    fn = "conv2d"
    if isinstance(input, torch.Tensor) and input.dim() == 3:
        # Unbatched (C, H, W), as F.conv2d takes it: a batch of one.
        if isinstance(residual, torch.Tensor):
            residual = residual.unsqueeze(0)
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                      activation=activation, residual=residual, backend=backend).squeeze(0)
    if isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor):
        input, weight, bias, residual = autocast_inputs(input, weight, bias, residual)
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {tuple(t.shape)} ((N, C, "
                             "H, W) input, or unbatched (C, H, W); (K, C/groups, R, S) weight)")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got "
                            f"{t.dtype}")
    if input.dtype != weight.dtype:
        raise TypeError(f"{fn}: input and weight must have one dtype, got {input.dtype} and "
                        f"{weight.dtype}")
    if input.device != weight.device:
        raise ValueError(f"{fn}: input is on {input.device}, weight on {weight.device}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{fn}: groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"{fn}: groups must be a positive int, got {groups!r}")
    channels, out_channels = input.shape[1], weight.shape[0]
    if channels % groups or out_channels % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the input channels ({channels}) "
                         f"and the output channels ({out_channels}): {_shapes(input, weight)}")
    if weight.shape[1] * groups != channels:
        raise ValueError(f"{fn}: channel mismatch: weight expects {weight.shape[1]} * groups "
                         f"({groups}) = {weight.shape[1] * groups} input channels, input has "
                         f"{channels}: {_shapes(input, weight)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{fn}: bias must be a torch.Tensor or None, got "
                            f"{type(bias).__name__}")
        if tuple(bias.shape) != (out_channels,):
            raise ValueError(f"{fn}: bias must have shape ({out_channels},), got "
                             f"{tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"{fn}: bias must be a floating-point tensor, got {bias.dtype}")
        if bias.device != input.device:
            raise ValueError(f"{fn}: bias is on {bias.device}, input on {input.device}")
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATION_NAMES}, got "
                         f"{activation!r}")
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{fn}: stride and dilation must be >= 1, got {stride}, {dilation}")
    r, s = weight.shape[2], weight.shape[3]
    crop = [0, 0]  # leading output rows / columns to drop (asymmetric "same", below)
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":
        if stride != [1, 1]:
            raise ValueError(f"{fn}: padding='same' is not supported for strided convolutions "
                             f"(stride {stride}), as in PyTorch")
        total = [dilation[0] * (r - 1), dilation[1] * (s - 1)]
        # An odd total (even kernel extent): PyTorch pads total // 2 before and one more
        # after. The kernels pad symmetrically, so they pad the larger side on both and the
        # first output row (column) is dropped: output i then starts at input
        # i - total // 2, as PyTorch's does.
        padding = [-(-t // 2) for t in total]
        crop = [t % 2 for t in total]
    elif isinstance(padding, str):
        raise ValueError(f"{fn}: padding strings are 'same' and 'valid' (lower case, as in "
                         f"PyTorch), got {padding!r}")
    else:
        padding = _pair(padding, "padding")
        if min(padding) < 0:
            raise ValueError(f"{fn}: padding must be >= 0, got {padding}")
    p = _out_size(input.shape[2], padding[0], dilation[0], r, stride[0])
    q = _out_size(input.shape[3], padding[1], dilation[1], s, stride[1])
    if p < 1 or q < 1:
        raise ValueError(f"{fn}: the kernel ({r}x{s}, dilation {dilation}) is larger than "
                         f"the padded input ({input.shape[2]}x{input.shape[3]} + padding "
                         f"{padding}): {_shapes(input, weight)}")
    if residual is not None:
        out_shape = (input.shape[0], out_channels, p - crop[0], q - crop[1])
        _check_residual(residual, input, weight, out_shape)

    name = _backend.pick("conv2d", input, backend, kernel_limits(input, weight, groups))
    if name == "torch":
        return _torch_conv2d(input, weight, bias, stride, "same" if any(crop) else padding,
                             dilation, groups, activation, residual)
    channels_last = _output_channels_last(input, weight)
    if channels_last and not _is_channels_last(input):
        # As PyTorch's own convolutions do, the kernels then run in channels-last (a copy
        # of the input, which also gives one contiguous both ways channels-last strides).
        input = input.clone(memory_format=torch.channels_last)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias, residual))
    if residual is not None and any(crop):
        # The kernels compute the rows and columns the crop drops too: zeros there.
        residual = F.pad(residual, (crop[1], 0, crop[0], 0))
    save_pre = bool(activation is not None and needs_grad)
    filters_per_group = weight.shape[0] // groups
    if groups > 1 and weight.shape[1] == 1 and filters_per_group > 1:
        # A channel multiplier (one channel, several filters per group): the depthwise conv
        # of the input with each channel repeated once per filter, which the depthwise
        # kernels take (the GEMM kernels would fill each group's one channel and few
        # filters out to a whole tile); autograd sums the repeats' gradients.
        input = _repeat_channels(input, filters_per_group)
        groups = weight.shape[0]
    if name == "cuda":
        out = _cuda_conv2d(input, weight, bias, residual, stride, padding, dilation, groups,
                           activation or "none", save_pre)
    else:
        out, _ = torch.ops.tilesmith.conv2d_fwd_triton(
            input, weight, bias, residual, stride, padding, dilation, groups,
            activation or "none", save_pre)
    if any(crop):  # (autograd pads the gradient back)
        out = out[:, :, crop[0]:, crop[1]:]
    # A copy only after a crop.
    return out.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _shapes(input, weight) -> str:
    """The operands' shapes, for error messages (formatted only when one is raised: this is
    every call's path)."""
    return f"input {tuple(input.shape)}, weight {tuple(weight.shape)}"


def _check_residual(residual, input, weight, out_shape):
    fn = "conv2d"
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{fn}: residual must be a torch.Tensor or None, got "
                        f"{type(residual).__name__}")
    if tuple(residual.shape) != out_shape:
        raise ValueError(f"{fn}: residual must have the output's shape {out_shape}, got "
                         f"{tuple(residual.shape)} ({_shapes(input, weight)})")
    if residual.dtype != input.dtype:
        raise TypeError(f"{fn}: residual must have the input's dtype {input.dtype}, got "
                        f"{residual.dtype}")
    if residual.device != input.device:
        raise ValueError(f"{fn}: residual is on {residual.device}, input on {input.device}")


def _repeat_channels(x, times):
    """x with each channel repeated ``times`` times (channel c at c * times ..), in x's
    memory format."""
    if _is_channels_last(x):
        return x.permute(0, 2, 3, 1).repeat_interleave(times, dim=3).permute(0, 3, 1, 2)
    return x.repeat_interleave(times, dim=1)


def cuda_zero_padding(channels: int, filters: int, groups: int) -> tuple[int, int, int]:
    """(groups, channels per group, filters per group) that the cuda kernels run a conv of
    ``channels`` inputs and ``filters`` outputs in: the GEMM kernels need channels and
    filters per group that are multiples of 8 (16-byte rows), the depthwise kernel a
    multiple of 8 channels, so the rest are zero-filled up to those (a depthwise conv gains
    zero channels, any other conv zero channels and filters in each group; conv2d makes a
    channel multiplier depthwise first)."""
    per_group, filters_per_group = channels // groups, filters // groups
    if groups > 1 and per_group == filters_per_group == 1:
        return -(-groups // 8) * 8, 1, 1
    return groups, -(-per_group // 8) * 8, -(-filters_per_group // 8) * 8


def _cuda_forward(x, weight, bias, residual, stride, padding, dilation, activation, save_pre):
    return torch.ops.tilesmith.conv2d_fwd_cuda(x, weight, bias, residual, stride, padding,
                                               dilation, activation, save_pre)


class _GradientInFormat(torch.autograd.Function):
    """The identity, whose backward hands on the gradient laid out in ``memory_format``."""

    @staticmethod
    def forward(ctx, t, memory_format):
        ctx.memory_format = memory_format
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.memory_format), None


def _cuda_conv2d(x, weight, bias, residual, stride, padding, dilation, groups, activation,
                 save_pre):
    """The cuda forward of any channel count: where the kernels need more channels or
    filters per group (cuda_zero_padding), x, weight, bias and residual are copied
    zero-filled, in channels-last (the kernels' layout), and the output's real filters
    copied out into x's memory format. Differentiable: autograd takes the gradients back
    through the copies, so the backward's dgrad and wgrad run on the filled shapes too, and
    hands each on in its tensor's memory format, as PyTorch's convolutions do (the copies'
    own backward would leave strided views of the filled gradients)."""
    channels = x.shape[1]
    filters, per_group = weight.shape[:2]
    filters_per_group = filters // groups
    wide_groups, wide_channels, wide_filters = cuda_zero_padding(channels, filters, groups)
    if (wide_groups, wide_channels, wide_filters) == (groups, per_group, filters_per_group):
        out, _ = _cuda_forward(x, weight, bias, residual, stride, padding, dilation,
                               activation, save_pre)
        return out
    x = _GradientInFormat.apply(x, _format_of(x))
    weight = _GradientInFormat.apply(weight, _format_of(weight))
    if bias is not None:
        bias = _GradientInFormat.apply(bias, torch.contiguous_format)
    if residual is not None:
        residual = _GradientInFormat.apply(residual, _format_of(residual))
    more_groups = wide_groups - groups
    more_channels = wide_channels - per_group
    more_filters = wide_filters - filters_per_group
    # (N, H, W, groups, channels per group): pad the last two dimensions.
    pixels = x.permute(0, 2, 3, 1).unflatten(3, (groups, per_group))
    wide_x = F.pad(pixels, (0, more_channels, 0, more_groups)).flatten(3, 4).permute(0, 3, 1, 2)
    # (groups, filters per group, R, S, channels per group).
    taps = weight.permute(0, 2, 3, 1).unflatten(0, (groups, filters_per_group))
    wide_weight = F.pad(taps, (0, more_channels, 0, 0, 0, 0, 0, more_filters, 0, more_groups))
    wide_weight = wide_weight.flatten(0, 1).permute(0, 3, 1, 2)
    wide_bias = wide_residual = None
    if bias is not None:
        wide_bias = F.pad(bias.view(groups, -1), (0, more_filters, 0, more_groups)).flatten()
    if residual is not None:  # (N, P, Q, groups, filters per group), as the output
        wide_residual = F.pad(residual.permute(0, 2, 3, 1).unflatten(3, (groups, -1)),
                              (0, more_filters, 0, more_groups)).flatten(3, 4).permute(0, 3, 1, 2)
    out, _ = _cuda_forward(wide_x, wide_weight, wide_bias, wide_residual, stride, padding,
                           dilation, activation, save_pre)
    # (N, P, Q, groups, filters per group) of the real groups and filters, copied out.
    real = out.permute(0, 2, 3, 1).unflatten(3, (wide_groups, wide_filters))
    real = real[:, :, :, :groups, :filters_per_group]
    if _is_channels_last(x):
        return real.flatten(3, 4).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
    # (One copy, with NCHW strides also for 1x1 pixels, where .contiguous() keeps others.)
    return real.permute(0, 3, 4, 1, 2).clone(memory_format=torch.contiguous_format).flatten(1, 2)


def kernel_limits(input, weight, groups=1) -> dict[str, str | None]:
    """Why each of tilesmith's conv2d backends cannot run this call (None: it can). Both
    take every convolution ``conv2d`` accepts whose groups fit along a grid axis, which
    CUDA caps at 65535 programs: the GEMM kernels launch a slice per group (the cuda weight
    gradient one per group and filter tap), the Triton depthwise kernels one per block of
    channels (and the weight gradient one per tap); only layers far larger than any
    model's reach that. The cuda backend zero-fills channel counts its kernels do not take
    (cuda_zero_padding), but not zero channels."""
    filters, per_group, r, s = weight.shape
    taps = r * s
    limits: dict[str, str | None] = {"triton": None, "cuda": None}

    def too_many(what: str, count: int) -> str:
        return (f"the conv2d kernels launch one grid slice per {what}, {count} here, and a "
                f"CUDA grid axis holds at most {MAX_GRID_YZ}")

    if _is_depthwise(groups, input.shape[1], filters):
        block_c = _depthwise_blocks(filters)["BLOCK_C"]
        if -(-filters // block_c) > MAX_GRID_YZ:
            limits["triton"] = too_many(f"block of {block_c} channels", -(-filters // block_c))
        elif taps > MAX_GRID_YZ:
            limits["triton"] = too_many("filter tap in the weight gradient", taps)
    elif groups > MAX_GRID_YZ:
        limits["triton"] = too_many("group", groups)
    # The cuda backend runs a conv of one channel per group (and more than one group) in
    # its depthwise kernel, whose grid has no group axis.
    if per_group == 0:
        limits["cuda"] = (f"the cuda conv2d kernels need at least one input channel per "
                          f"group, got weight {tuple(weight.shape)}")
    elif not (groups > 1 and per_group == 1) and groups * taps > MAX_GRID_YZ:
        limits["cuda"] = too_many("group and filter tap in the weight gradient",
                                  groups * taps)
    return limits


register_autocast("conv2d_fwd_triton")
register_autocast("conv2d_fwd_cuda")

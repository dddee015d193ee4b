"""GEMM with a fused epilogue: out = act(alpha * (a @ b) + bias) + residual (or, with
RESIDUAL_FIRST, conv2d's act(alpha * (a @ b) + bias + residual)), fp32
accumulation (fp64 for fp64 inputs, which exist for gradcheck), the epilogue in the same
precision, one rounding to the output dtype. Optionally also
stores the pre-activation (what the activation is applied to) that the backward needs for act'.

The backward's activation derivative runs as one elementwise pass (activation_backward_kernel
below): dz = grad * act'(pre), after which dA, dB and dbias are plain products and a sum.
"""

import triton
import triton.language as tl

from ._common import spilled_program_id, to_output
from .matmul import accumulate_tile, grouped_tile, matmul_configs

ACT_NONE = 0
ACT_RELU = 1
ACT_GELU = 2
ACT_GELU_TANH = 3
ACT_SILU = 4
ACT_RELU6 = 5
ACT_HARDSWISH = 6
ACT_SIGMOID = 7
ACT_HARDSIGMOID = 8
ACTIVATIONS = {None: ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH,
               "silu": ACT_SILU, "relu6": ACT_RELU6, "hardswish": ACT_HARDSWISH,
               "sigmoid": ACT_SIGMOID, "hardsigmoid": ACT_HARDSIGMOID}

SQRT_2_OVER_PI = 0.7978845608028654
INV_SQRT_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _tanh(x):
    # tanh via sigmoid (exact identity), which every Triton version has.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        # Not tl.maximum, which on the GPU returns 0 for a NaN: torch.relu keeps the NaN
        # (and -0.0).
        z = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        z = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 4:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 5:
        z = _relu6(z)
    elif ACTIVATION == 6:
        z = z * _relu6(z + 3.0) / 6.0
    elif ACTIVATION == 7:
        z = tl.sigmoid(z)
    elif ACTIVATION == 8:
        z = _relu6(z + 3.0) / 6.0
    return z


@triton.jit
def _relu6(z):
    # As torch's hardtanh(z, 0, 6): a NaN stays NaN.
    return tl.where(z <= 0.0, 0.0, tl.where(z >= 6.0, 6.0, z))


@triton.jit
def activation_derivative(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        d = tl.where(z <= 0.0, 0.0, 1.0)  # 1 at a NaN, as torch's threshold_backward
    elif ACTIVATION == 2:
        d = (0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
             + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
    elif ACTIVATION == 3:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * z * z)
    elif ACTIVATION == 4:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 5:
        d = tl.where((z > 0.0) & (z < 6.0), 1.0, 0.0)  # 0 at a NaN, as torch's hardtanh's
    elif ACTIVATION == 6:
        d = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z / 3.0 + 0.5, 1.0))  # and hardswish's
    elif ACTIVATION == 7:
        s = tl.sigmoid(z)
        d = s * (1.0 - s)
    elif ACTIVATION == 8:
        d = tl.where((z > -3.0) & (z < 3.0), 1.0 / 6.0, 0.0)  # 0 at a NaN, as torch's
    else:
        d = tl.full(z.shape, 1.0, z.dtype)
    return d


@triton.autotune(configs=matmul_configs(),
                 key=["M", "N", "K", "A_K_UNIT", "B_N_UNIT", "ACTIVATION", "HAS_BIAS",
                      "HAS_RESIDUAL", "STORE_PRE"])
@triton.jit
def gemm_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, residual_ptr, pre_ptr,
    M, N, K, alpha,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    stride_rm, stride_rn, stride_pm, stride_pn,
    A_K_UNIT: tl.constexpr, B_N_UNIT: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RESIDUAL_FIRST: tl.constexpr, STORE_PRE: tl.constexpr, HAS_ALPHA: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    z = accumulate_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk,
                        stride_bn, UPCAST, INPUT_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N,
                        BLOCK_K)
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_ALPHA:
        z = z * alpha
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)
        z = z + bias[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                           mask=in_bounds, other=0.0).to(ACC_DTYPE)
        if RESIDUAL_FIRST:
            z = z + residual
    if STORE_PRE:
        tl.store(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                 to_output(z, pre_ptr, UPCAST), mask=in_bounds)
    y = activation(z, ACTIVATION)
    if HAS_RESIDUAL and not RESIDUAL_FIRST:
        y = y + residual
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             to_output(y, out_ptr, UPCAST), mask=in_bounds)


@triton.jit
def activation_backward_kernel(grad_ptr, pre_ptr, dz_ptr, partials_ptr, M, N, stride_gm,
                               stride_gn, stride_pm, stride_pn, ACTIVATION: tl.constexpr,
                               BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
                               COMPUTE_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """dz = grad * act'(pre), written contiguous (M, N) in dz's dtype; with BIAS_GRAD, this
    block's column sums of dz (before rounding) as row program_id(0) of partials (., N).
    Column blocks lie over grid axes 1 and 2 (spill_grid): N past 8M passes 65535 of them."""
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = spilled_program_id() * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    grad = tl.load(grad_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                   mask=in_bounds, other=0.0).to(COMPUTE_DTYPE)
    pre = tl.load(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                  mask=in_bounds, other=0.0).to(COMPUTE_DTYPE)
    dz = grad * activation_derivative(pre, ACTIVATION)  # 0 outside: grad is loaded as 0
    tl.store(dz_ptr + offs_m[:, None] * N + offs_n[None, :], to_output(dz, dz_ptr, UPCAST),
             mask=in_bounds)
    if BIAS_GRAD:
        tl.store(partials_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(dz, axis=0),
                 mask=offs_n < N)

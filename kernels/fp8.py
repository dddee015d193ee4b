"""FP8: quantization (amax, scale and cast) and scaled GEMM.

Scales are dequantization multipliers, as in torch._scaled_mm: x ~ x_fp8 * scale, with
scale = amax / FP8_MAX. The cast uses x * (FP8_MAX / amax): the reciprocal is computed in
fp64 and rounded once to fp32 (a correctly rounded fp32 division, so a plain PyTorch
reference reproduces every bit), the product is clamped to +-FP8_MAX (saturation) and cast
with round-to-nearest-even. A zero amax is raised to 1e-12 so zero inputs stay zero.
A NaN or an infinity is never cast to a finite number: every max and the clamp here keep
NaNs (Triton's tl.max and tl.maximum drop them on the GPU), so, as in the reference, a NaN
makes its group's amax, scale and values NaN, and an infinity makes its group's scale inf
and its own value NaN (inf * 0).

Granularities (GRANULARITY, numbered as ops/fp8.py's _GRANULARITY): 0 one scale per tensor,
1 one per row, 2 one per 1 x BLOCK_K block of a row (activations), 3 one per
BLOCK_M x BLOCK_K tile (weights).
"""

import triton
import triton.language as tl

from ._common import spilled_program_id, to_output
from .gemm import activation
from .matmul import grouped_tile


@triton.jit
def round_to_fp8_grid(v, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """v (fp32, within the format's range) rounded to the nearest fp8 value, ties to even,
    still as fp32: only needed under the interpreter, whose fp32 -> fp8 cast does not round
    to nearest for about 3% of values; after this the cast is exact."""
    bits = v.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    exponent = tl.maximum(exponent, MIN_EXPONENT)  # subnormals share the smallest quantum
    quantum = tl.exp2((exponent - MANTISSA_BITS).to(tl.float32))
    scaled = v / quantum  # a power of two: exact
    # 1.5 * 2**23: adding and subtracting it rounds |scaled| < 2**22 to an integer, ties to
    # even, in fp32 arithmetic.
    rounded = (scaled + 12582912.0) - 12582912.0
    # What rounds to zero keeps its sign (the sum above gives +0 for small negatives), as
    # the hardware cast's -0.
    rounded = tl.where(rounded == 0.0, scaled * 0.0, rounded)
    return rounded * quantum


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(x, axis):
    """max |x| of float32 x along axis (None: all of x), NaN where any is NaN (as torch.amax).
    Taken on the bits: with the sign bit cleared, a float32's bits read as an int32 order
    as its magnitude does, and a NaN's are above +inf's. An integer max keeps the NaN
    without relying on tl.max's or abs's NaN handling, in one reduction, and the
    interpreter runs it with numpy (a custom combine function runs there as a Python loop)."""
    magnitude_bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(magnitude_bits, axis).to(tl.float32, bitcast=True)


@triton.jit
def _cast(v, q_ptr, FP8_MAX: tl.constexpr, UPCAST: tl.constexpr,
          MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    v = tl.clamp(v, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if UPCAST:
        v = round_to_fp8_grid(v, MANTISSA_BITS, MIN_EXPONENT)
        # The interpreter's cast also turns a NaN into a finite value (+-384 in e4m3):
        # write NaN's bits, 0x7f in both formats, where the hardware cast gives them.
        nan = tl.full(v.shape, 0x7F, tl.uint8).to(q_ptr.dtype.element_ty, bitcast=True)
        return tl.where(v != v, nan, v.to(q_ptr.dtype.element_ty))
    return v.to(q_ptr.dtype.element_ty)


@triton.jit
def _reciprocal_and_scale(amax, FP8_MAX: tl.constexpr):
    amax = _max_keeping_nan(amax, 1e-12)
    inverse = (FP8_MAX / amax.to(tl.float64)).to(tl.float32)
    scale = (amax.to(tl.float64) / FP8_MAX).to(tl.float32)
    return inverse, scale


@triton.jit
def amax_kernel(x_ptr, amax_ptr, M, K, stride_m, stride_k,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor-wise stage 1: max |x| of one tile, folded into *amax_ptr (zero-initialised)
    with an atomic max. Stage 2 (quantize_kernel) reads it on the device: no host sync.
    Column blocks lie over grid axes 1 and 2 (spill_grid); one past K loads only zeros."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = spilled_program_id() * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k,
                mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
    # _amax's result has its sign bit clear, so the float atomic max (a signed integer max
    # for such values) keeps a NaN, whose bits are above +inf's.
    tl.atomic_max(amax_ptr, _amax(x, None))


@triton.jit
def quantize_kernel(x_ptr, q_ptr, scale_ptr, amax_ptr, M, K, stride_m, stride_k,
                    stride_sm, stride_sk,
                    GRANULARITY: tl.constexpr, FP8_MAX: tl.constexpr,
                    MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """q (M, K contiguous) and scale. One program per BLOCK_M rows, or per tile
    (granularity 2: BLOCK_M rows x one scale block; 3 and 0: one tile), the column blocks
    over grid axes 1 and 2 (spill_grid)."""
    block = spilled_program_id()  # 0 for row-wise scaling, whose programs walk whole rows
    if block * BLOCK_K >= K:  # past the last column block of a spilled grid
        return
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if GRANULARITY == 1:
        # Row-wise: the amax pass and the cast pass both walk the row inside this program
        # (the second read mostly hits L2), one launch for the whole quantization.
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k,
                        mask=row_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
            amax = _max_keeping_nan(amax, _amax(x, 1))
        inverse, scale = _reciprocal_and_scale(amax, FP8_MAX)
        tl.store(scale_ptr + rows * stride_sm, scale, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k,
                        mask=ok, other=0.0).to(tl.float32)
            q = _cast(x * inverse[:, None], q_ptr, FP8_MAX, UPCAST, MANTISSA_BITS, MIN_EXPONENT)
            tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=ok)
    else:
        cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=ok,
                    other=0.0).to(tl.float32)
        if GRANULARITY == 0:
            inverse, scale = _reciprocal_and_scale(tl.load(amax_ptr), FP8_MAX)
            q = _cast(x * inverse, q_ptr, FP8_MAX, UPCAST, MANTISSA_BITS, MIN_EXPONENT)
            if (tl.program_id(0) == 0) & (block == 0):
                tl.store(scale_ptr, scale)
        elif GRANULARITY == 2:
            inverse, scale = _reciprocal_and_scale(_amax(x, 1), FP8_MAX)
            q = _cast(x * inverse[:, None], q_ptr, FP8_MAX, UPCAST, MANTISSA_BITS,
                      MIN_EXPONENT)
            tl.store(scale_ptr + rows * stride_sm + block * stride_sk, scale, mask=row_ok)
        else:
            inverse, scale = _reciprocal_and_scale(_amax(x, None), FP8_MAX)
            q = _cast(x * inverse, q_ptr, FP8_MAX, UPCAST, MANTISSA_BITS, MIN_EXPONENT)
            tl.store(scale_ptr + tl.program_id(0) * stride_sm + block * stride_sk, scale)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=ok)


@triton.jit
def scaled_gemm_kernel(
    a_ptr, b_ptr, out_ptr, scale_a_ptr, scale_b_ptr, bias_ptr, residual_ptr, pre_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    stride_sam, stride_sak, stride_sbk, stride_sbn, stride_rm, stride_rn,
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = act((a * scale_a) @ (b * scale_b) + bias) + residual (act numbered as gemm's
    ACTIVATIONS); pre, the part inside act, stored where STORE_PRE (laid out as out).
    A_SCALE / B_SCALE: 0 per tensor, 1 per row of a / column of b, 2 per block (a:
    1 x BLOCK_K, b: BLOCK_K x BLOCK_N; the launcher makes BLOCK_K = BLOCK_N = the scale
    block). Per-block scales multiply each K step's partial product as it is accumulated,
    the others multiply the finished sum."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter has no fp8 arithmetic; fp8 values are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if A_SCALE == 2:
            kb = k0 // BLOCK_K
            partial = tl.dot(a, b, out_dtype=tl.float32)
            sa = tl.load(scale_a_ptr + offs_m * stride_sam + kb * stride_sak, mask=m_ok,
                         other=0.0)
            sb = tl.load(scale_b_ptr + kb * stride_sbk + pid_n * stride_sbn)
            acc += partial * (sa * sb)[:, None]
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if A_SCALE == 0:
        acc = acc * tl.load(scale_a_ptr)
    if A_SCALE == 1:
        acc = acc * tl.load(scale_a_ptr + offs_m * stride_sam, mask=m_ok, other=0.0)[:, None]
    if B_SCALE == 0:
        acc = acc * tl.load(scale_b_ptr)
    if B_SCALE == 1:
        acc = acc * tl.load(scale_b_ptr + offs_n * stride_sbn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    in_bounds = m_ok[:, None] & n_ok[None, :]
    out_offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, to_output(acc, pre_ptr, UPCAST), mask=in_bounds)
    acc = activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                       mask=in_bounds, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, to_output(acc, out_ptr, UPCAST), mask=in_bounds)

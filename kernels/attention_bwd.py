"""Flash-style attention backward: recomputes the probabilities from the saved log-sum-exp
instead of storing them, so memory stays linear in sequence length.

With s the scaled, masked scores (natural log domain), p = exp(s - lse), out = p @ v and
delta = rowsum(dout * out) (computed before these kernels):
    dv = p^T @ dout,   dp = dout @ v^T,   ds = p * (dp - delta),
    dq = scale * ds @ k,   dk = scale * ds^T @ q,   d(additive mask) = ds.
Two kernels, so neither needs atomics for q, k or v: one program per key block computes
dk and dv (looping over every query block of every query head that shares the key/value
head), one program per query block computes dq and, when asked, the mask gradient (atomic
adds: a broadcast mask sums over the dimensions it is broadcast along).
"""

import triton
import triton.language as tl

from ._common import to_output
from .attention_fwd import load_block, masked_scores, sequence_bounds


@triton.jit
def probabilities(q, k, rows, cols, lse_base, seqlen_q, seqlen_k, mask_ptrs, qk_scale,
                  MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    s = tl.dot(q, k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
    s, valid = masked_scores(s, rows, cols, seqlen_q, seqlen_k, mask_ptrs, MASK_KIND, CAUSAL)
    lse = tl.load(lse_base + rows, mask=rows < seqlen_q, other=0.0).to(ACC_DTYPE)
    # Fully masked rows saved lse = -inf; their probabilities are all 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    return p, valid


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    num_kv_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v, qk_scale, scale,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    h_kv = bh % num_kv_heads
    q_start, seqlen_q = sequence_bounds(cu_seqlens_q_ptr, b, seqlen_q, VARLEN)
    k_start, seqlen_k = sequence_bounds(cu_seqlens_k_ptr, b, seqlen_k, VARLEN)
    b64 = b.to(tl.int64)

    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = k_ptr + b64 * stride_kb + h_kv * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = v_ptr + b64 * stride_vb + h_kv * stride_vh + k_start.to(tl.int64) * stride_vs
    # k and v are read transposed ([d, n]): the products below want them that way.
    k_t = load_block(k_base, offs_d, head_dim, stride_kd, cols, seqlen_k, stride_ks, UPCAST,
                     ACC_DTYPE)
    v_t = load_block(v_base, offs_dv, head_dim_v, stride_vd, cols, seqlen_k, stride_vs, UPCAST,
                     ACC_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC_DTYPE)

    # Causal: query rows before this key block cannot see it.
    lo = 0
    if CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    hi = tl.where(start_n * BLOCK_N < seqlen_k, seqlen_q, 0)
    for g in range(0, group_size):
        h = h_kv * group_size + g
        q_base = q_ptr + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qs
        do_base = do_ptr + b64 * stride_dob + h * stride_doh + q_start.to(tl.int64) * stride_dos
        lse_base = lse_ptr + b64 * stride_lb + h * stride_lh + q_start
        delta_base = delta_ptr + b64 * stride_lb + h * stride_lh + q_start
        mask_base = mask_ptr + b64 * stride_mb + h * stride_mh
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen_q
            q = load_block(q_base, rows, seqlen_q, stride_qs, offs_d, head_dim, stride_qd,
                           UPCAST, ACC_DTYPE)
            do = load_block(do_base, rows, seqlen_q, stride_dos, offs_dv, head_dim_v,
                            stride_dod, UPCAST, ACC_DTYPE)
            p, valid = probabilities(
                q, k_t, rows, cols, lse_base, seqlen_q, seqlen_k,
                mask_base + rows[:, None] * stride_mq + cols[None, :] * stride_mk, qk_scale,
                MASK_KIND, CAUSAL, INPUT_PRECISION, ACC_DTYPE)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION,
                         out_dtype=ACC_DTYPE)
            dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION,
                         out_dtype=ACC_DTYPE)

    dk = dk * scale
    col_ok = cols[:, None] < seqlen_k
    dk_base = dk_ptr + b64 * stride_dkb + h_kv * stride_dkh + k_start.to(tl.int64) * stride_dks
    tl.store(dk_base + cols[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             to_output(dk, dk_ptr, UPCAST), mask=col_ok & (offs_d[None, :] < head_dim))
    dv_base = dv_ptr + b64 * stride_dvb + h_kv * stride_dvh + k_start.to(tl.int64) * stride_dvs
    tl.store(dv_base + cols[:, None] * stride_dvs + offs_dv[None, :] * stride_dvd,
             to_output(dv, dv_ptr, UPCAST), mask=col_ok & (offs_dv[None, :] < head_dim_v))


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dmask_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v, qk_scale, scale,
    MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr, CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    h_kv = h // group_size
    q_start, seqlen_q = sequence_bounds(cu_seqlens_q_ptr, b, seqlen_q, VARLEN)
    k_start, seqlen_k = sequence_bounds(cu_seqlens_k_ptr, b, seqlen_k, VARLEN)
    b64 = b.to(tl.int64)

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = q_ptr + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qs
    do_base = do_ptr + b64 * stride_dob + h * stride_doh + q_start.to(tl.int64) * stride_dos
    k_base = k_ptr + b64 * stride_kb + h_kv * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = v_ptr + b64 * stride_vb + h_kv * stride_vh + k_start.to(tl.int64) * stride_vs
    lse_base = lse_ptr + b64 * stride_lb + h * stride_lh + q_start
    mask_base = mask_ptr + b64 * stride_mb + h * stride_mh
    dmask_base = dmask_ptr + b64 * stride_mb + h * stride_mh

    q = load_block(q_base, rows, seqlen_q, stride_qs, offs_d, head_dim, stride_qd, UPCAST,
                   ACC_DTYPE)
    do = load_block(do_base, rows, seqlen_q, stride_dos, offs_dv, head_dim_v, stride_dod,
                    UPCAST, ACC_DTYPE)
    delta = tl.load(delta_ptr + b64 * stride_lb + h * stride_lh + q_start + rows, mask=row_ok,
                    other=0.0).to(ACC_DTYPE)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

    hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, (start_m + 1) * BLOCK_M)
    hi = tl.where(start_m * BLOCK_M < seqlen_q, hi, 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = load_block(k_base, offs_d, head_dim, stride_kd, cols, seqlen_k, stride_ks, UPCAST,
                         ACC_DTYPE)
        v_t = load_block(v_base, offs_dv, head_dim_v, stride_vd, cols, seqlen_k, stride_vs,
                         UPCAST, ACC_DTYPE)
        mask_offsets = rows[:, None] * stride_mq + cols[None, :] * stride_mk
        p, valid = probabilities(q, k_t, rows, cols, lse_base, seqlen_q, seqlen_k,
                                 mask_base + mask_offsets, qk_scale, MASK_KIND, CAUSAL,
                                 INPUT_PRECISION, ACC_DTYPE)
        dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=INPUT_PRECISION,
                     out_dtype=ACC_DTYPE)
        if MASK_GRAD:
            in_bounds = row_ok[:, None] & (cols[None, :] < seqlen_k)
            tl.atomic_add(dmask_base + mask_offsets, ds.to(dmask_ptr.dtype.element_ty),
                          mask=in_bounds)

    dq = dq * scale
    dq_base = dq_ptr + b64 * stride_dqb + h * stride_dqh + q_start.to(tl.int64) * stride_dqs
    tl.store(dq_base + rows[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             to_output(dq, dq_ptr, UPCAST), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))

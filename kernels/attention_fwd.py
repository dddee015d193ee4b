"""Flash-style attention forward: online softmax over key blocks, never forming the full
score matrix; saves the log-sum-exp of every query row for the backward.

One program computes BLOCK_M query rows of one (batch, head): program (m, head, batch), an
axis each, as flash-attention lays its grid out (CUDA allows 65535 programs along axes 1 and
2, so batch * heads on one axis would cap the product there). Scores live in the log2
domain (qk_scale = scale * log2(e)) so the exponentials are exp2. Optional pieces are
compile-time switches: a boolean or additive mask (strides of 0 broadcast it), causal
masking aligned top-left as in torch.nn.functional.scaled_dot_product_attention, grouped
key/value heads, packed variable-length batches (cu_seqlens), and dropout of the
probabilities (dropout_keep: Philox, so the backward regenerates the same mask).

Calls with too few query blocks to fill the GPU (decoding) split the keys (SPLIT): program
(m * splits + i, head, batch) walks keys i * split_keys .. (i + 1) * split_keys - 1 only and
writes its rows' output, normalised over those keys, and their log-sum-exp to fp32
partials; attention_split_combine_kernel then weighs each split by exp(lse_i - lse).
Flash-decoding's scheme; the result and lse are those of one pass, up to rounding.

Grouped-query calls with short queries pack each key/value head's group of query heads into
one block's rows (PACK_GQA): program (m, h_kv, batch) takes packed rows m * BLOCK_M
onwards, packed row r being query row r // group_size of query head h_kv * group_size +
r % group_size. The group then reads each K and V block once instead of once per query head
(decoding with 8 query heads per kv head reads an eighth of the cache), and its rows fill the
block instead of leaving most of it empty.
"""

import os

import triton
import triton.language as tl

from ._common import to_output

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634  # host side: scale * log2(e) makes the kernel's exponentials exp2

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADD = 2


def tile_config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                         num_stages=stages)


# The forward's autotune space on a GPU, by the widest head dim's block (64, 128, 256): the
# first entry of each list is the one TILESMITH_TRITON_AUTOTUNE=first keeps. Every entry is
# checked on its own by test_every_tile_config_is_correct.
FWD_CONFIGS = {
    64: [tile_config(128, 64, 4, 3), tile_config(64, 64, 4, 3), tile_config(128, 128, 8, 3),
         tile_config(128, 32, 4, 4), tile_config(128, 64, 4, 4)],
    128: [tile_config(128, 64, 8, 3), tile_config(128, 64, 4, 3), tile_config(64, 64, 4, 3),
          tile_config(128, 128, 8, 3), tile_config(128, 32, 4, 4)],
    256: [tile_config(64, 32, 4, 2), tile_config(64, 64, 4, 2), tile_config(64, 64, 8, 2),
          tile_config(128, 32, 8, 2), tile_config(32, 32, 4, 2)],
}


@triton.jit
def sequence_bounds(cu_seqlens_ptr, b, fixed_len, VARLEN: tl.constexpr):
    """(first token, length) of sequence b: packed batches read them from cu_seqlens."""
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + b)
        length = tl.load(cu_seqlens_ptr + b + 1) - start
    else:
        start = 0
        length = fixed_len
    return start, length


@triton.jit
def load_block(base, rows, row_limit, stride_rows, cols, col_limit, stride_cols,
               UPCAST: tl.constexpr, DTYPE: tl.constexpr):
    """base[rows, cols] with out-of-range entries 0; upcast to DTYPE under the interpreter.
    A transposed block is the same call with rows and columns swapped."""
    block = tl.load(base + rows[:, None] * stride_rows + cols[None, :] * stride_cols,
                    mask=(rows[:, None] < row_limit) & (cols[None, :] < col_limit), other=0.0)
    if UPCAST:
        block = block.to(DTYPE)
    return block


@triton.jit
def masked_scores(s, rows, cols, seqlen_q, seqlen_k, mask_ptrs,
                  MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores (log2 domain) with every excluded position at -inf, and the validity mask."""
    valid = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=valid, other=0)
        valid = valid & (keep != 0)
    if MASK_KIND == 2:
        bias = tl.load(mask_ptrs, mask=valid, other=0.0)
        s = s + bias.to(s.dtype) * 1.4426950408889634
    s = tl.where(valid, s, float("-inf"))
    return s, valid


@triton.jit
def dropout_keep(seed, stream, rows, start_n, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which probabilities of a BLOCK_M x BLOCK_N tile (query rows ``rows``, keys from
    ``start_n``, a multiple of 4) survive dropout in ``stream`` (batch * heads + query head;
    a [BLOCK_M, 1] column of them where the rows belong to different heads).
    One Philox call, counter (key // 4, row, stream, 0), gives the uniform 32-bit words of
    four neighbouring keys, so the mask is a function of (seed, stream, row, key) alone:
    the backward's kernels, whose tiles differ, regenerate exactly the forward's mask.
    A word is kept when it is >= threshold = dropout_p * 2**32."""
    zero = tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.uint32)
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = zero + groups.to(tl.uint32)[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    c2 = zero + stream.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, zero)
    # Key 4g + i takes word i of group g.
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return words.to(tl.int64) >= threshold


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh,
    num_heads, group_size, seqlen_q, seqlen_k, head_dim, head_dim_v, qk_scale,
    dropout_threshold, dropout_scale, tune_seqlen,
    split_keys, stride_o_split, stride_l_split,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    SPLIT: tl.constexpr, PACK_GQA: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # tune_seqlen is read by the autotuner only (its key): the longer sequence length rounded
    # up to a power of two, so that a new length does not mean a new tuning run. With SPLIT,
    # o_ptr and lse_ptr are the partials, split i stride_o_split / stride_l_split further on,
    # and split_keys is a multiple of every BLOCK_N.
    start_m = tl.program_id(0)
    if SPLIT:  # axis 0 holds (query block, split) pairs; seqlen_k is still the launch's here
        splits = tl.cdiv(seqlen_k, split_keys)
        split = start_m % splits
        start_m = start_m // splits
    b = tl.program_id(2)
    # rows: each block row's query row; heads: its query head (a scalar unless PACK_GQA).
    if PACK_GQA:
        h_kv = tl.program_id(1)
        packed = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = packed // group_size
        heads = h_kv * group_size + packed % group_size
    else:
        heads = tl.program_id(1)
        h_kv = heads // group_size
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_start, seqlen_q = sequence_bounds(cu_seqlens_q_ptr, b, seqlen_q, VARLEN)
    k_start, seqlen_k = sequence_bounds(cu_seqlens_k_ptr, b, seqlen_k, VARLEN)
    b64 = b.to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_rows = rows < seqlen_q
    # Row pointers of q, the mask, out and lse ([BLOCK_M] each).
    tokens = q_start.to(tl.int64) + rows
    q_rows = q_ptr + b64 * stride_qb + heads * stride_qh + tokens * stride_qs
    # (64-bit offsets: a bias of 64 heads of 8k x 8k passes 2^31 elements, one 48k x 48k
    # mask too.)
    mask_rows = (mask_ptr + b64 * stride_mb + heads.to(tl.int64) * stride_mh
                 + rows.to(tl.int64) * stride_mq)
    k_base = k_ptr + b64 * stride_kb + h_kv * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = v_ptr + b64 * stride_vb + h_kv * stride_vh + k_start.to(tl.int64) * stride_vs

    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd,
                mask=in_rows[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    if UPCAST:
        q = q.to(ACC_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        stream = b * num_heads + heads  # dropout_keep's stream of each row
        if PACK_GQA:
            stream = stream[:, None]

    # Key blocks this query block can see; none when the block lies past its sequence
    # (packed batches launch for the longest sequence).
    hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, tl.max(rows) + 1)
    hi = tl.where(tl.min(rows) < seqlen_q, hi, 0)
    lo = 0
    if SPLIT:
        lo = split * split_keys
        hi = tl.minimum(hi, lo + split_keys)
        o_ptr += split.to(tl.int64) * stride_o_split
        lse_ptr += split.to(tl.int64) * stride_l_split
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = load_block(k_base, offs_d, head_dim, stride_kd, cols, seqlen_k, stride_ks, UPCAST,
                         ACC_DTYPE)
        s = tl.dot(q, k_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        s, valid = masked_scores(s, rows, cols, seqlen_q, seqlen_k,
                                 mask_rows[:, None] + cols.to(tl.int64)[None, :] * stride_mk,
                                 MASK_KIND, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; exponentiate against 0 instead so
        # that exp2(-inf - (-inf)) never makes a NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_block(v_base, cols, seqlen_k, stride_vs, offs_dv, head_dim_v, stride_vd, UPCAST,
                       ACC_DTYPE)
        # Dropout removes probabilities from the product with v only: the normaliser l
        # sums them all, and the 1 / (1 - dropout_p) rescaling is applied once at the end.
        if DROPOUT:
            keep = dropout_keep(seed, stream, rows, start_n, dropout_threshold, BLOCK_M,
                                BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION,
                                            out_dtype=ACC_DTYPE)
        m_i = m_new

    # A fully masked row (l = 0) gives zeros and lse = -inf, as PyTorch does.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * dropout_scale
    # (m + log2 l) * ln 2: back to the natural log. (A literal: kernels cannot read module
    # globals that are not tl.constexpr, which the interpreter does not enforce.)
    lse = tl.where(empty, float("-inf"),
                   (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_rows = o_ptr + b64 * stride_ob + heads * stride_oh + tokens * stride_os
    tl.store(o_rows[:, None] + offs_dv[None, :] * stride_od, to_output(out, o_ptr, UPCAST),
             mask=in_rows[:, None] & (offs_dv[None, :] < head_dim_v))
    lse_rows = lse_ptr + b64 * stride_lb + heads * stride_lh + tokens
    tl.store(lse_rows, lse.to(lse_ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def attention_split_combine_kernel(
    o_part_ptr, lse_part_ptr, o_ptr, lse_ptr, cu_seqlens_q_ptr,
    stride_pb, stride_ph, stride_ps, stride_pd, stride_p_split,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_l_split,
    num_splits, seqlen_q, head_dim_v,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out and lse of BLOCK_M query rows of one (batch, head) from the key splits' partials:
    lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) out_i. The partial lse share
    lse's layout (split i stride_l_split further on); a row that no split saw keeps zeros and
    lse = -inf."""
    start_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = sequence_bounds(cu_seqlens_q_ptr, b, seqlen_q, VARLEN)
    b64 = b.to(tl.int64)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_rows = rows < seqlen_q
    in_block = in_rows[:, None] & (offs_dv[None, :] < head_dim_v)
    lse_rows = lse_part_ptr + b64 * stride_lb + h * stride_lh + q_start + rows
    part_rows = (o_part_ptr + b64 * stride_pb + h * stride_ph
                 + (q_start + rows).to(tl.int64)[:, None] * stride_ps
                 + offs_dv[None, :] * stride_pd)

    m = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    for i in range(0, num_splits):
        part = tl.load(lse_rows + i * stride_l_split, mask=in_rows, other=float("-inf"))
        m = tl.maximum(m, part.to(ACC_DTYPE))
    m_base = tl.where(m == float("-inf"), 0.0, m)  # no NaN from -inf - (-inf)
    total = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)
    for i in range(0, num_splits):
        weight = tl.exp(tl.load(lse_rows + i * stride_l_split, mask=in_rows,
                                other=float("-inf")).to(ACC_DTYPE) - m_base)
        part = tl.load(part_rows + i * stride_p_split, mask=in_block, other=0.0)
        total += weight
        acc += weight[:, None] * part.to(ACC_DTYPE)

    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), m_base + tl.log(tl.where(empty, 1.0, total)))
    o_base = o_ptr + b64 * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_os
    tl.store(o_base + rows[:, None] * stride_os + offs_dv[None, :] * stride_od,
             to_output(out, o_ptr, UPCAST), mask=in_block)
    lse_base = lse_ptr + b64 * stride_lb + h * stride_lh + q_start
    tl.store(lse_base + rows, lse.to(lse_ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def dropout_mask_kernel(seed_ptr, keep_ptr, seqlen_q, seqlen_k, threshold,
                        stride_stream, stride_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask the attention kernels use, written out (for tests and debugging):
    keep[stream, row, key] for BLOCK_M query rows of one (batch, head) per program, laid
    out (m, head, batch) as the attention kernels' grids; stream = batch * heads + head."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    stream = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    seed = tl.load(seed_ptr)
    row_ptrs = (keep_ptr + stream.to(tl.int64) * stride_stream
                + rows.to(tl.int64)[:, None] * stride_row)
    for start_n in range(0, seqlen_k, BLOCK_N):
        keep = dropout_keep(seed, stream, rows, start_n, threshold, BLOCK_M, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        tl.store(row_ptrs + cols[None, :], keep.to(tl.uint8),
                 mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))

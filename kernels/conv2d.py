"""2-D convolution as implicit GEMM: no im2col buffer is ever written; each program
gathers its (pixels x reduction) tile of the input straight from the tensor, with the
padding, stride and dilation folded into the load mask. Strides are arguments, so one
kernel serves NCHW and channels_last (NHWC); the reduction index runs channel-innermost,
which makes the gathers contiguous in NHWC.

    forward   out[n, k, p, q]  = sum_{c, r, s} x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw]
                                                 * w[k, c, r, s]
              GEMM (N*P*Q) x K, reduction C/groups * R * S, epilogue bias (+ residual)
              + activation.
    dgrad     dx[n, c, h, w]   = sum_{k, r, s} dy[n, k, (h + ph - r*dh)/sh, ...] w[k, c, r, s]
              over the (r, s) for which that division is exact and in range. Which taps
              divide exactly depends only on the pixel's phase (h % sh, w % sw), so there is
              one GEMM per phase (third grid dimension) over its pixels and only its taps:
              a stride of 2 x 2 would otherwise multiply four times the work by zeros.
    wgrad     dw[k, c, r, s]   = sum_{n, p, q} dy[n, k, p, q] x[n, c, p*sh - ph + r*dh, ...]
              reduction N*P*Q split over SPLITS programs writing fp32 partial sums.
Groups are the second grid dimension. Depthwise convolutions (groups = C = K) take the
direct kernels at the end of this file instead.
"""

import triton
import triton.language as tl

from ._common import to_output
from .gemm import activation
from .matmul import grouped_tile


@triton.jit
def conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, pre_ptr,
    N, H, W, P, Q, R, S, C_GROUP, K_GROUP,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swk, swc, swr, sws, son, sok, sop, soq, srn, srk, srp, srq,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PRE: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    g = tl.program_id(1)
    M = N * P * Q
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, K_GROUP, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_m // (P * Q)
    p = (offs_m % (P * Q)) // Q
    q = offs_m % Q
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    row_ok = offs_m < M
    col_ok = offs_k < K_GROUP
    x_rows = x_ptr + n * sxn + (g * C_GROUP) * sxc
    w_cols = w_ptr + (g * K_GROUP + offs_k).to(tl.int64) * swk

    reduction = C_GROUP * R * S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for red0 in range(0, reduction, BLOCK_K):
        red = red0 + tl.arange(0, BLOCK_K)
        red_ok = red < reduction
        c = red % C_GROUP
        r = (red // C_GROUP) // S
        s = (red // C_GROUP) % S
        ih = h0[:, None] + r[None, :] * dil_h
        iw = w0[:, None] + s[None, :] * dil_w
        x_ok = (row_ok[:, None] & red_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                & (iw < W))
        xt = tl.load(x_rows[:, None] + c[None, :] * sxc + ih * sxh + iw * sxw, mask=x_ok,
                     other=0.0)
        wt = tl.load(w_cols[None, :] + c[:, None] * swc + r[:, None] * swr + s[:, None] * sws,
                     mask=red_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(ACC_DTYPE)
            wt = wt.to(ACC_DTYPE)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    channel = g * K_GROUP + offs_k
    offsets = (n * son + p * sop + q * soq)[:, None] + channel[None, :].to(tl.int64) * sok
    residual_offsets = (n * srn + p * srp + q * srq)[:, None] + channel[None, :].to(tl.int64) * srk
    forward_epilogue(acc, bias_ptr, residual_ptr, out_ptr, pre_ptr, channel, offsets,
                     residual_offsets, row_ok, col_ok, ACTIVATION, HAS_BIAS, HAS_RESIDUAL,
                     STORE_PRE, UPCAST, ACC_DTYPE)


@triton.jit
def forward_epilogue(acc, bias_ptr, residual_ptr, out_ptr, pre_ptr, channel, offsets,
                     residual_offsets, row_ok, col_ok, ACTIVATION: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     STORE_PRE: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Both forward kernels' end: + bias[channel], + the residual (before the activation,
    as a ResNet block's relu(conv + identity)), the pre-activation copy the backward needs,
    the activation, the store of the (pixels x channels) tile at `offsets`."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + channel, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        acc = acc + tl.load(residual_ptr + residual_offsets, mask=ok, other=0.0).to(ACC_DTYPE)
    if STORE_PRE:
        tl.store(pre_ptr + offsets, to_output(acc, pre_ptr, UPCAST), mask=ok)
    tl.store(out_ptr + offsets, to_output(activation(acc, ACTIVATION), out_ptr, UPCAST), mask=ok)


@triton.jit
def phase_taps(phase, pad, dilation, stride, KERNEL, TAPS_PAD: tl.constexpr):
    """The taps along one axis that reach input pixels of phase `phase` (h % stride):
    the r < KERNEL with phase + pad - r * dilation a multiple of stride. They run from the
    first, stride / gcd(dilation, stride) apart; returns (first, count)."""
    t = tl.arange(0, TAPS_PAD)
    reach = (t < KERNEL) & ((phase + pad - t * dilation) % stride == 0)
    return tl.min(tl.where(reach, t, TAPS_PAD), axis=0), tl.sum(reach.to(tl.int32), axis=0)


@triton.jit
def conv2d_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    N, H, W, P, Q, R, S, C_GROUP, K_GROUP,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_r, step_s,
    syn, syk, syp, syq, swk, swc, swr, sws, sxn, sxc, sxh, sxw,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    TAPS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    g = tl.program_id(1)
    # This program's phase: input pixels h = phase_h + i * stride_h, w likewise.
    phase_h = tl.program_id(2) // stride_w
    phase_w = tl.program_id(2) % stride_w
    rows = (H - phase_h + stride_h - 1) // stride_h  # 0 when phase_h >= H
    cols = (W - phase_w + stride_w - 1) // stride_w
    M = N * rows * cols
    if tl.program_id(0) >= tl.cdiv(M, BLOCK_M) * tl.cdiv(C_GROUP, BLOCK_N):
        return  # the grid fits the largest phase
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, C_GROUP, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_m // (rows * cols)
    h = phase_h + (offs_m % (rows * cols)) // cols * stride_h
    w = phase_w + offs_m % cols * stride_w
    row_ok = offs_m < M
    col_ok = offs_c < C_GROUP
    dy_rows = dy_ptr + n * syn + (g * K_GROUP) * syk
    w_cols = w_ptr + (g * K_GROUP).to(tl.int64) * swk + offs_c * swc
    first_r, taps_r = phase_taps(phase_h, pad_h, dil_h, stride_h, R, TAPS_PAD)
    first_s, taps_s = phase_taps(phase_w, pad_w, dil_w, stride_w, S, TAPS_PAD)

    reduction = K_GROUP * taps_r * taps_s
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for red0 in range(0, reduction, BLOCK_K):
        red = red0 + tl.arange(0, BLOCK_K)
        red_ok = red < reduction
        k = red % K_GROUP
        r = first_r + (red // K_GROUP) // taps_s * step_r
        s = first_s + (red // K_GROUP) % taps_s * step_s
        # The output pixel whose window put tap (r, s) on input pixel (h, w): the phase
        # makes the divisions exact; it may lie outside dy.
        ph = h[:, None] + pad_h - r[None, :] * dil_h
        pw = w[:, None] + pad_w - s[None, :] * dil_w
        p = ph // stride_h
        q = pw // stride_w
        y_ok = (row_ok[:, None] & red_ok[None, :] & (ph >= 0) & (pw >= 0) & (p < P) & (q < Q))
        dyt = tl.load(dy_rows[:, None] + k[None, :] * syk + p * syp + q * syq, mask=y_ok,
                      other=0.0)
        wt = tl.load(w_cols[None, :] + k[:, None].to(tl.int64) * swk + r[:, None] * swr
                     + s[:, None] * sws, mask=red_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(ACC_DTYPE)
            wt = wt.to(ACC_DTYPE)
        acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    offsets = (n * sxn + h * sxh + w * sxw)[:, None] + (g * C_GROUP + offs_c)[None, :].to(
        tl.int64) * sxc
    tl.store(dx_ptr + offsets, to_output(acc, dx_ptr, UPCAST),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def conv2d_wgrad_kernel(
    dy_ptr, x_ptr, partial_ptr,
    N, H, W, P, Q, R, S, C_GROUP, K_GROUP, CHUNK,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    syn, syk, syp, syq, sxn, sxc, sxh, sxw,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """partial[split, g*K_GROUP + k, (c*R + r)*S + s] over reduction indices
    [split*CHUNK, (split+1)*CHUNK) of N*P*Q, in fp32 (summed over splits afterwards)."""
    g = tl.program_id(1)
    split = tl.program_id(2)
    CRS = C_GROUP * R * S
    pid_m, pid_n = grouped_tile(tl.program_id(0), K_GROUP, CRS, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_crs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K_GROUP
    crs_ok = offs_crs < CRS
    c = offs_crs // (R * S)
    r = (offs_crs // S) % R
    s = offs_crs % S
    dy_k = dy_ptr + (g * K_GROUP + offs_k).to(tl.int64) * syk
    x_c = x_ptr + (g * C_GROUP + c).to(tl.int64) * sxc

    total = N * P * Q
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, total)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for red0 in range(start, end, BLOCK_K):
        red = (red0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        red_ok = red < end
        n = red // (P * Q)
        p = (red % (P * Q)) // Q
        q = red % Q
        dyt = tl.load(dy_k[:, None] + (n * syn + p * syp + q * syq)[None, :],
                      mask=k_ok[:, None] & red_ok[None, :], other=0.0)
        ih = (p * stride_h - pad_h)[:, None] + r[None, :] * dil_h
        iw = (q * stride_w - pad_w)[:, None] + s[None, :] * dil_w
        x_ok = red_ok[:, None] & crs_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_c[None, :] + (n * sxn)[:, None] + ih * sxh + iw * sxw, mask=x_ok,
                     other=0.0)
        if UPCAST:
            dyt = dyt.to(ACC_DTYPE)
            xt = xt.to(ACC_DTYPE)
        acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    rows = (split * (K_GROUP * tl.num_programs(1)) + g * K_GROUP + offs_k).to(tl.int64)
    tl.store(partial_ptr + rows[:, None] * CRS + offs_crs[None, :], acc,
             mask=k_ok[:, None] & crs_ok[None, :])


# ---- depthwise (groups = C = K): direct kernels --------------------------------------------
# One filter per channel leaves no reduction over channels for tl.dot to use: as implicit
# GEMM each group is a GEMM one column wide, and a 16-wide tile would idle 15 lanes of 16.
# These kernels instead give each program a tile of pixels x channels (contiguous in
# channels_last) and accumulate the R * S taps elementwise, in fp32.

@triton.jit
def depthwise_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, pre_ptr,
    N, C, H, W, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swc, swr, sws, son, soc, sop, soq, srn, src, srp, srq,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PRE: tl.constexpr,
    UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[n, c, p, q] = act(sum_{r, s} x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] w[c, r, s]
    + bias[c] + residual[n, c, p, q]) for BLOCK_M output pixels x BLOCK_C channels."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_m < N * P * Q
    col_ok = offs_c < C
    n = offs_m // (P * Q)
    p = (offs_m % (P * Q)) // Q
    q = offs_m % Q
    x_pixels = x_ptr + n * sxn
    x_channels = offs_c.to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
    for r in range(0, R):
        ih = p * stride_h - pad_h + r * dil_h
        for s in range(0, S):
            iw = q * stride_w - pad_w + s * dil_w
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load((x_pixels + ih * sxh + iw * sxw)[:, None] + x_channels[None, :],
                         mask=ok[:, None] & col_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_c * swc + r * swr + s * sws, mask=col_ok, other=0.0)
            acc += xt.to(ACC_DTYPE) * wt.to(ACC_DTYPE)[None, :]

    offsets = (n * son + p * sop + q * soq)[:, None] + offs_c[None, :].to(tl.int64) * soc
    residual_offsets = (n * srn + p * srp + q * srq)[:, None] + offs_c[None, :].to(tl.int64) * src
    forward_epilogue(acc, bias_ptr, residual_ptr, out_ptr, pre_ptr, offs_c, offsets,
                     residual_offsets, row_ok, col_ok, ACTIVATION, HAS_BIAS, HAS_RESIDUAL,
                     STORE_PRE, UPCAST, ACC_DTYPE)


@triton.jit
def depthwise_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    N, C, H, W, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    syn, syc, syp, syq, swc, swr, sws, sxn, sxc, sxh, sxw,
    UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx[n, c, h, w] = sum_{r, s} dy[n, c, (h + ph - r*dh) / sh, (w + pw - s*dw) / sw] w[c, r, s]
    over the taps whose division is exact and lands inside dy."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_m < N * H * W
    col_ok = offs_c < C
    n = offs_m // (H * W)
    h = (offs_m % (H * W)) // W
    w = offs_m % W
    dy_pixels = dy_ptr + n * syn
    dy_channels = offs_c.to(tl.int64) * syc
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
    for r in range(0, R):
        ph = h + pad_h - r * dil_h  # p * stride_h when tap r of output row p reads row h
        p = ph // stride_h
        p_ok = (ph >= 0) & (ph % stride_h == 0) & (p < P)
        for s in range(0, S):
            qw = w + pad_w - s * dil_w
            q = qw // stride_w
            ok = row_ok & p_ok & (qw >= 0) & (qw % stride_w == 0) & (q < Q)
            dyt = tl.load((dy_pixels + p * syp + q * syq)[:, None] + dy_channels[None, :],
                          mask=ok[:, None] & col_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_c * swc + r * swr + s * sws, mask=col_ok, other=0.0)
            acc += dyt.to(ACC_DTYPE) * wt.to(ACC_DTYPE)[None, :]
    offsets = (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :].to(tl.int64) * sxc
    tl.store(dx_ptr + offsets, to_output(acc, dx_ptr, UPCAST),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def depthwise_wgrad_kernel(
    dy_ptr, x_ptr, partial_ptr,
    N, C, H, W, P, Q, R, S, CHUNK,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    syn, syc, syp, syq, sxn, sxc, sxh, sxw,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """partial[split, r*S + s, c] = sum over output pixels [split*CHUNK, (split+1)*CHUNK) of
    dy[n, c, p, q] x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw]: one tap per program (grid
    axis 2), summed over the splits afterwards in a fixed order."""
    split = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(2)
    r = tap // S
    s = tap % S
    col_ok = offs_c < C
    dy_channels = offs_c.to(tl.int64) * syc
    x_channels = offs_c.to(tl.int64) * sxc
    total = N * P * Q
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, total)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        n = offs_m // (P * Q)
        p = (offs_m % (P * Q)) // Q
        q = offs_m % Q
        ih = p * stride_h - pad_h + r * dil_h
        iw = q * stride_w - pad_w + s * dil_w
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dyt = tl.load((dy_ptr + n * syn + p * syp + q * syq)[:, None] + dy_channels[None, :],
                      mask=ok[:, None] & col_ok[None, :], other=0.0)
        xt = tl.load((x_ptr + n * sxn + ih * sxh + iw * sxw)[:, None] + x_channels[None, :],
                     mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += dyt.to(ACC_DTYPE) * xt.to(ACC_DTYPE)
    row = (split * R * S + tap).to(tl.int64)
    tl.store(partial_ptr + row * C + offs_c, tl.sum(acc, axis=0), mask=col_ok)

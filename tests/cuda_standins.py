"""CPU stand-ins for the cuda backend's registered ops, so that the Python around them runs
in the CPU test suite: the cuda branches of tilesmith.ops (zero-filled channels, layouts,
the autograd formulas and the backward calls they make) otherwise first run on a GPU.

Each stand-in checks what its C++ function checks (csrc/*/*_api.cpp; the check that
tensors are on a GPU aside), returns outputs of the shapes, dtypes and layouts the C++
returns, and computes them with PyTorch in float32. They say nothing of the kernels: those
are test_cuda_emulated's and the GPU run's. ``enabled()`` registers them for CPU tensors
and makes the cuda backend available there, for the duration of a ``with`` block.
"""

from __future__ import annotations

import collections
import contextlib
import importlib

import torch
import torch.nn.functional as F

from tilesmith import backend, testing

# The C++ reads "the input's memory format" by the Python's rule (conv2d_api.cpp).
_is_channels_last = importlib.import_module("tilesmith.ops.conv2d")._is_channels_last

ACTIVATIONS = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu,
               "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
               "relu6": F.relu6, "hardswish": F.hardswish, "sigmoid": torch.sigmoid,
               "hardsigmoid": F.hardsigmoid}
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)


def check(condition: bool, message: str) -> None:
    """TORCH_CHECK: a RuntimeError, as the C++ functions raise."""
    if not condition:
        raise RuntimeError(message)


def _derivative(z, name):
    """act'(z) in fp32 (written out: autograd may be off where opcheck runs the op)."""
    if name == "relu":
        return (z > 0).float()
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) * (
            2 * torch.pi) ** -0.5
    if name == "gelu_tanh":
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "relu6":
        return ((z > 0) & (z < 6)).float()
    if name == "hardswish":
        return torch.where(z <= -3, 0.0, torch.where(z < 3, z / 3 + 0.5, 1.0))
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "hardsigmoid":
        return ((z > -3) & (z < 3)).float() / 6
    return torch.ones_like(z)


def _activation(name: str, op: str):
    check(name in ACTIVATIONS, f"{op}: activation must be none, relu, gelu, gelu_tanh, silu, "
          f"relu6, hardswish, sigmoid or hardsigmoid, got {name}")
    return ACTIVATIONS[name]


# --- matmul and gemm: csrc/matmul/matmul_api.cpp, csrc/gemm/gemm_api.cpp -----------------------

def _check_tensor_core_operands(a, b, op):
    check(a.dtype == b.dtype, f"{op}: a and b must have the same dtype")
    check(a.dtype in TENSOR_CORE_DTYPES, f"{op} (cuda backend): dtype must be float16 or "
          f"bfloat16, got {a.dtype}")


def matmul_cuda(a, b):
    _check_tensor_core_operands(a, b, "matmul")
    check(a.dim() == b.dim() and a.dim() in (2, 3), "matmul_cuda: a and b must both be 2-D or "
          "both 3-D")
    check(a.dim() == 2 or a.shape[0] == b.shape[0], "matmul_cuda: batch sizes differ")
    check(a.shape[-1] == b.shape[-2], "matmul: inner dimensions differ")
    return torch.matmul(a.float(), b.float()).to(a.dtype).contiguous()


def gemm_cuda(a, b, bias, residual, activation, alpha, out_dtype, save_pre):
    _check_tensor_core_operands(a, b, "gemm")
    check(a.dim() == 2 and b.dim() == 2, "gemm: a and b must be 2-D")
    check(out_dtype in (a.dtype, torch.float32), "gemm (cuda backend): out_dtype must be the "
          "input dtype or float32")
    m, k = a.shape
    n = b.shape[1]
    check(b.shape[0] == k, "gemm: inner dimensions differ")
    check(bias is None or tuple(bias.shape) == (n,), "gemm: bias must have shape (n,)")
    check(residual is None or tuple(residual.shape) == (m, n), "gemm: residual must be (m, n)")
    act = _activation(activation, "gemm")
    z = alpha * (a.float() @ b.float())
    if bias is not None:
        z = z + bias.float()
    out = act(z)
    if residual is not None:
        out = out + residual.to(out_dtype).float()
    pre = z.to(out_dtype) if save_pre else a.new_empty((0, 0), dtype=out_dtype)
    return out.to(out_dtype), pre


def activation_backward_cuda(grad, pre, activation, bias_grad, dz_dtype):
    check(pre.dim() == 2 and grad.shape == pre.shape, "activation_backward: grad and pre must "
          "be 2-D of one shape")
    check(dz_dtype in TENSOR_CORE_DTYPES, "activation_backward (cuda backend): dz_dtype must be "
          "float16 or bfloat16")
    check(pre.dtype in (dz_dtype, torch.float32), "activation_backward (cuda backend): pre "
          "must be float32 or dz_dtype")
    check(grad.dtype in (pre.dtype, torch.float32), "activation_backward (cuda backend): grad "
          "must be float32 or pre's dtype")
    _activation(activation, "activation_backward")
    dz = grad.float() * _derivative(pre.float(), activation)
    sums = dz.sum(0) if bias_grad else dz.new_empty((0,))
    return dz.to(dz_dtype).contiguous(), sums


# --- conv2d: csrc/conv2d/conv2d_api.cpp ---------------------------------------------------------

def _check_conv_operand(t, name, like):
    check(t.dtype in TENSOR_CORE_DTYPES, f"conv2d (cuda backend): {name} must be float16 or "
          f"bfloat16, got {t.dtype}")
    check(t.dtype == like.dtype, f"conv2d: {name} has dtype {t.dtype}, expected {like.dtype}")
    check(t.dim() == 4, f"conv2d: {name} must be 4-D, got shape {tuple(t.shape)}")


def _is_depthwise(channels, filters, weight_channels):
    return weight_channels == 1 and filters == channels and channels > 1


def _conv_geometry(c, k, c_group, stride, padding, dilation, depthwise):
    """The groups, after geometry()'s or depthwise_geometry()'s checks."""
    check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
          "conv2d: stride, padding and dilation must each have 2 entries")
    if depthwise:
        check(c % 8 == 0, f"conv2d (cuda backend): depthwise channels must be a multiple of 8 "
              f"(16-byte vectors), got {c}")
        return c
    check(c_group > 0 and c % c_group == 0 and k % (c // c_group) == 0,
          f"conv2d: {c} input channels and {k} filters do not split into groups of {c_group}")
    groups = c // c_group
    check(c_group % 8 == 0 and (k // groups) % 8 == 0,
          f"conv2d (cuda backend): input channels and filters per group must be multiples of "
          f"8 (16-byte rows), got {c_group} and {k // groups} (groups {groups})")
    return groups


def _in_layout(t, channels_last):
    """A channels-last result as the C++ returns it: as it is, or cloned to NCHW."""
    t = t.contiguous(memory_format=torch.channels_last)
    return t if channels_last else t.clone(memory_format=torch.contiguous_format)


def conv2d_fwd_cuda(x, weight, bias, residual, stride, padding, dilation, activation, save_pre):
    _check_conv_operand(x, "input", x)
    _check_conv_operand(weight, "weight", x)
    c, k = x.shape[1], weight.shape[0]
    groups = _conv_geometry(c, k, weight.shape[1], stride, padding, dilation,
                            _is_depthwise(c, k, weight.shape[1]))
    check(bias is None or tuple(bias.shape) == (k,), f"conv2d: bias must be a ({k},) tensor")
    act = _activation(activation, "conv2d")
    z = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride,
                 padding, dilation, groups)
    check(z.shape[2] > 0 and z.shape[3] > 0, "conv2d: empty output")
    if residual is not None:
        _check_conv_operand(residual, "residual", x)
        check(residual.shape == z.shape, f"conv2d: residual must have the output's shape "
              f"{tuple(z.shape)}, got {tuple(residual.shape)}")
        z = z + residual.float()
    channels_last = _is_channels_last(x)
    pre = (_in_layout(z.to(x.dtype), channels_last) if save_pre
           else x.new_empty((0, 0, 0, 0)))
    return _in_layout(act(z).to(x.dtype), channels_last), pre


def conv2d_dgrad_cuda(grad, weight, input_shape, stride, padding, dilation, want_channels_last):
    _check_conv_operand(grad, "grad", grad)
    _check_conv_operand(weight, "weight", grad)
    check(len(input_shape) == 4, "conv2d dgrad: input_shape must have 4 entries")
    n, c = input_shape[:2]
    k = weight.shape[0]
    groups = _conv_geometry(c, k, weight.shape[1], stride, padding, dilation,
                            _is_depthwise(c, k, weight.shape[1]))
    check(stride[0] * stride[1] <= 65535, "conv2d dgrad on the cuda backend takes "
          "stride_h * stride_w up to 65535")
    dx = torch.nn.grad.conv2d_input(list(input_shape), weight.float(), grad.float(), stride,
                                    padding, dilation, groups)
    expected = F.conv2d(dx.new_empty(input_shape), weight.float(), None, stride, padding,
                        dilation, groups).shape
    check(grad.shape == expected, f"conv2d dgrad: grad has shape {tuple(grad.shape)}, the "
          f"forward's output was {tuple(expected)}")
    return _in_layout(dx.to(grad.dtype), want_channels_last)


def conv2d_wgrad_cuda(grad, x, weight_shape, stride, padding, dilation):
    _check_conv_operand(grad, "grad", grad)
    _check_conv_operand(x, "input", grad)
    check(len(weight_shape) == 4, "conv2d wgrad: weight_shape must have 4 entries")
    c, k = x.shape[1], weight_shape[0]
    groups = _conv_geometry(c, k, weight_shape[1], stride, padding, dilation,
                            _is_depthwise(c, k, weight_shape[1]))
    dw = torch.nn.grad.conv2d_weight(x.float(), list(weight_shape), grad.float(), stride,
                                     padding, dilation, groups)
    expected = F.conv2d(x.float(), dw, None, stride, padding, dilation, groups).shape
    check(grad.shape == expected, f"conv2d wgrad: grad has shape {tuple(grad.shape)}, the "
          f"forward's output was {tuple(expected)}")
    # (K, R, S, C) memory seen as (K, C, R, S): channels-last strides.
    return dw.to(x.dtype).contiguous(memory_format=torch.channels_last)


# --- attention: csrc/attention/attention_api.cpp ------------------------------------------------

def _check_attention_operand(t, name, q):
    check(t.dtype == q.dtype, f"attention: {name} has dtype {t.dtype}, query {q.dtype}")
    check(t.dim() == 4, f"attention: {name} must be 4-D (batch, heads, seq, head_dim), got "
          f"{tuple(t.shape)}")


def _check_attention_inputs(q, k, v):
    for t, name in ((q, "query"), (k, "key"), (v, "value")):
        _check_attention_operand(t, name, q)
    check(q.dtype in TENSOR_CORE_DTYPES, f"attention (cuda backend): dtype must be float16 or "
          f"bfloat16, got {q.dtype}")
    d = q.shape[3]
    check(0 < d <= 256 and d % 8 == 0 and k.shape[3] == d and v.shape[3] == d,
          "attention (cuda backend): query, key and value head dims must be equal, a "
          "multiple of 8 and at most 256")
    check(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0], "attention: batch sizes differ")
    check(k.shape[1:3] == v.shape[1:3], "attention: key and value shapes differ")
    check(q.shape[1] % k.shape[1] == 0 if k.shape[1] else q.shape[1] == 0,
          "attention: query heads must be a multiple of key/value heads")
    check(q.shape[0] <= 65535 and q.shape[1] <= 65535, "attention (cuda backend): batch and "
          "heads must each be at most 65535")


def _check_attention_mask(mask, q, k):
    if mask is None:
        return
    check(mask.dim() == 4 and mask.dtype in (torch.bool, q.dtype, torch.float32),
          f"attention: attn_mask must be a 4-D bool, {q.dtype} or float32 tensor, got "
          f"{mask.dtype} {tuple(mask.shape)}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    check(all(m in (1, f) for m, f in zip(mask.shape, full)), f"attention: attn_mask "
          f"{tuple(mask.shape)} does not broadcast to (batch, heads, seq_q, seq_k) = {full}")


def _dropout_scale(dropout_p, seed, batch, heads, seqlen_q, seqlen_k):
    """The kept probabilities' factor (0 or 1 / (1 - p)) of the kernels' dropout mask, or 1."""
    check(0.0 <= dropout_p < 1.0, f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return 1.0
    check(seed is not None and seed.dtype == torch.int64 and seed.numel() == 1,
          "attention: dropout_p > 0 needs seed: a 1-element int64 tensor")
    keep = testing.attention_dropout_keep_reference(int(seed.item()), batch, heads, seqlen_q,
                                                    seqlen_k, dropout_p)
    return keep.to(seed.device).float() / (1.0 - dropout_p)


def _grouped(t, heads):
    """A (batch, kv_heads, seq, dim) operand repeated for each of ``heads`` query heads."""
    return t.float().repeat_interleave(heads // t.shape[1], 1) if t.shape[1] else t.float()


def _probabilities(q, k, mask, causal, scale, lse=None):
    """(P, lse) in fp32: the softmax of the scores, rows with no visible key all 0 (lse
    -inf); with ``lse`` given, P = exp(S - lse) from it, as the backward kernels recompute
    it."""
    s = (q.float() @ _grouped(k, q.shape[1]).transpose(-1, -2)) * scale
    if causal:  # aligned top-left, as scaled_dot_product_attention
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    if lse is None:
        lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.view(*s.shape[:3], 1)).nan_to_num(nan=0.0)
    return p, lse


def _attention_layout(q, shape):
    """An empty (batch, heads, seq_q, dim) output laid out as the C++ lays it out: as q
    where q is (batch, seq, heads, dim) memory, else contiguous."""
    if q.stride(1) < q.stride(2):
        return q.new_empty((shape[0], shape[2], shape[1], shape[3])).transpose(1, 2)
    return q.new_empty(shape)


def _dense_forward(q, k, v, mask, causal, scale, dropout):
    p, lse = _probabilities(q, k, mask, causal, scale)
    return (p * dropout) @ _grouped(v, q.shape[1]), lse


def _dense_backward(grad_out, q, k, v, mask, out, lse, causal, scale, dropout, grad_lse):
    """(dq, dk, dv, dS) in fp32 from the forward's lse: dS = P (dP - (rowsum(dO O) - g))."""
    heads, kv_heads = q.shape[1], k.shape[1]
    p, _ = _probabilities(q, k, mask, causal, scale, lse)
    d_o = grad_out.float()
    dp = (d_o @ _grouped(v, heads).transpose(-1, -2)) * dropout
    delta = (d_o * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    ds = p * (dp - delta[..., None])

    def per_kv_head(t):  # the query heads' sums for each kv head
        return t.unflatten(1, (kv_heads, -1)).sum(2) if kv_heads else t[:, :0]

    dq = (ds @ _grouped(k, heads)) * scale
    dk = per_kv_head(ds.transpose(-1, -2) @ q.float()) * scale
    dv = per_kv_head((p * dropout).transpose(-1, -2) @ d_o)
    return dq, dk, dv, ds


def attention_fwd_cuda(q, k, v, mask, causal, scale, dropout_p, seed, keys_per_split=0):
    _check_attention_inputs(q, k, v)
    _check_attention_mask(mask, q, k)
    check(keys_per_split >= 0 and keys_per_split % 64 == 0, "attention (cuda backend): "
          "keys_per_split must be a multiple of 64 (0: no split)")
    dropout = _dropout_scale(dropout_p, seed, *q.shape[:3], k.shape[2])
    out, lse = _dense_forward(q, k, v, mask, causal, scale, dropout)
    return _attention_layout(q, out.shape).copy_(out), lse.contiguous()


def attention_bwd_cuda(grad_out, q, k, v, mask, out, lse, causal, scale, mask_grad, dropout_p,
                       seed, grad_lse=None):
    _check_attention_inputs(q, k, v)
    _check_attention_mask(mask, q, k)
    check(not mask_grad or (mask is not None and mask.is_floating_point()),
          "attention backward: mask_grad needs an additive (floating-point) mask")
    check(grad_lse is None or grad_lse.shape == lse.shape, "attention backward: grad_lse must "
          "have lse's shape")
    for t, name in ((grad_out, "grad_out"), (out, "out")):
        _check_attention_operand(t, name, q)
        check(t.shape == q.shape, f"attention backward: {name} must have the query's shape")
    check(lse.dtype == torch.float32 and lse.is_contiguous()
          and lse.numel() == q.shape[0] * q.shape[1] * q.shape[2],
          "attention backward: lse must be the forward's contiguous float32 tensor")
    dropout = _dropout_scale(dropout_p, seed, *q.shape[:3], k.shape[2])
    dq, dk, dv, ds = _dense_backward(grad_out, q, k, v, mask, out, lse.view(q.shape[:3]),
                                     causal, scale, dropout, grad_lse)
    dmask = ds.sum_to_size(mask.shape) if mask_grad else q.new_empty((0,), dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def _check_packing(q, k, v, cu_q, cu_k, max_q, max_k):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check(t.dim() == 3, f"varlen_attention: {name} must be 3-D (tokens, heads, head_dim)")
    _check_attention_inputs(*(t.transpose(0, 1)[None] for t in (q, k, v)))
    for cu in (cu_q, cu_k):
        check(cu.dtype == torch.int32 and cu.dim() == 1 and cu.is_contiguous(),
              "varlen_attention: cu_seqlens must be contiguous 1-D int32 tensors")
    check(cu_q.shape == cu_k.shape and cu_q.shape[0] >= 1 and cu_q.shape[0] - 1 <= 65535,
          "varlen_attention: cu_seqlens_q and cu_seqlens_k need batch + 1 entries")
    check(max_q >= 0 and max_k >= 0, "varlen_attention: max_seqlen_q and max_seqlen_k must be "
          ">= 0")


def _sequences(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, seed):
    """Per packed sequence: its query and key token ranges, its q, k, v as a dense batch of
    one, and its share of the dropout mask (batch entry i's, over its own positions)."""
    batch = cu_q.shape[0] - 1
    dropout = _dropout_scale(dropout_p, seed, batch, q.shape[1], max_q, max_k)
    for i in range(batch):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        keys = slice(int(cu_k[i]), int(cu_k[i + 1]))
        dense = [t[span].transpose(0, 1)[None] for t, span in ((q, rows), (k, keys), (v, keys))]
        share = dropout if dropout_p == 0.0 else dropout[i:i + 1, :, :rows.stop - rows.start,
                                                         :keys.stop - keys.start]
        yield rows, keys, dense, share


def varlen_attention_fwd_cuda(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p,
                              seed, keys_per_split=0):
    _check_packing(q, k, v, cu_q, cu_k, max_q, max_k)
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    for rows, _, dense, dropout in _sequences(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p,
                                              seed):
        o, l_ = _dense_forward(*dense, None, causal, scale, dropout)
        out[rows] = o[0].transpose(0, 1).to(q.dtype)
        lse[:, rows] = l_[0]
    return out, lse


def varlen_attention_bwd_cuda(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal,
                              scale, dropout_p, seed, grad_lse=None):
    _check_packing(q, k, v, cu_q, cu_k, max_q, max_k)
    check(grad_lse is None or grad_lse.shape == lse.shape, "varlen_attention backward: "
          "grad_lse must have lse's shape")
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
    for rows, keys, dense, dropout in _sequences(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p,
                                                 seed):
        def as_dense(t):
            return t[rows].transpose(0, 1)[None]

        grads = _dense_backward(as_dense(grad_out), *dense, None, as_dense(out),
                                lse[:, rows][None], causal, scale, dropout,
                                None if grad_lse is None else grad_lse[:, rows][None])
        dq[rows], dk[keys], dv[keys] = (g[0].transpose(0, 1) for g in grads[:3])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- fp8: csrc/fp8/fp8_api.cpp ------------------------------------------------------------------

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
GRANULARITIES = ("tensor", "row", "block", "block2d")  # the ops' granularity codes


def quantize_fp8_cuda(x, dtype, granularity, block_m, block_k):
    check(x.dim() == 2, f"quantize_fp8: x must be 2-D, got {tuple(x.shape)}")
    check(x.dtype in (torch.bfloat16, torch.float16, torch.float32), "quantize_fp8: x must be "
          f"bfloat16, float16 or float32, got {x.dtype}")
    check(dtype in FP8_DTYPES, f"quantize_fp8: dtype must be float8_e4m3fn or float8_e5m2, got "
          f"{dtype}")
    check(0 <= granularity <= 3, f"quantize_fp8: bad granularity {granularity}")
    name = GRANULARITIES[granularity]

    def power_of_two(b):
        return 16 <= b <= 2**30 and b & (b - 1) == 0

    check(not name.startswith("block") or (power_of_two(block_k) and (
        name == "block" or power_of_two(block_m))), "quantize_fp8: block sizes must be powers "
          "of two >= 16")
    blocks_k = -(-x.shape[1] // block_k) if name.startswith("block") else 1
    check(blocks_k <= 65535 and x.shape[1] // 256 < 65535, "quantize_fp8 (cuda backend): x "
          "has too many column blocks")
    q, scale = testing.quantize_fp8_reference(x, dtype, name, block_m, block_k)
    return q.contiguous(), scale.contiguous()  # row-major, whatever x's layout


def _dequantized(t, scale, kind, per_row_axis):
    """t (rows, cols) in fp64 times its scales as the kernels read them: the scale tensor's
    elements in row-major order (the C++ makes it contiguous) as one value (kind 0), one per
    row of a or column of b (1), or 128-wide blocks: (rows, ceil(cols / 128)) for a,
    (ceil(k / 128), ceil(n / 128)) for b (2)."""
    values = scale.float().contiguous().view(-1).double()
    t = t.double()
    if kind == 0:
        return t * values
    if kind == 1:
        return t * (values.view(-1, 1) if per_row_axis == 0 else values.view(1, -1))
    rows, cols = t.shape
    if per_row_axis == 0:  # a: 1 x 128 blocks
        blocks = values.view(rows, -1).repeat_interleave(128, 1)[:, :cols]
    else:  # b: 128 x 128 blocks
        blocks = values.view(-(-rows // 128), -1).repeat_interleave(128, 0).repeat_interleave(
            128, 1)[:rows, :cols]
    return t * blocks


def scaled_gemm_cuda(a, b, scale_a, scale_b, bias, residual, activation, out_dtype,
                     scale_a_kind, scale_b_kind, save_pre):
    check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0], "scaled_gemm: a and b "
          "must be (m, k) and (k, n)")
    check(a.dtype in FP8_DTYPES and b.dtype in FP8_DTYPES, "scaled_gemm: a and b must be "
          "float8_e4m3fn or float8_e5m2")
    check(out_dtype in (torch.bfloat16, torch.float16, torch.float32), "scaled_gemm: out_dtype "
          "must be bfloat16, float16 or float32")
    check(0 <= scale_a_kind <= 2 and 0 <= scale_b_kind <= 2
          and (scale_a_kind == 2) == (scale_b_kind == 2), "scaled_gemm: bad scale kinds")
    (m, k), n = a.shape, b.shape[1]
    blocks_k, blocks_n = -(-k // 128), -(-n // 128)
    want_a = (1, m, m * blocks_k)[scale_a_kind]
    want_b = (1, n, blocks_k * blocks_n)[scale_b_kind]
    check(scale_a.numel() == want_a and scale_b.numel() == want_b, "scaled_gemm: scale shapes "
          "do not match their kinds")
    check(bias is None or tuple(bias.shape) == (n,), f"scaled_gemm: bias must be a ({n},) "
          "tensor")
    check(residual is None or tuple(residual.shape) == (m, n), f"scaled_gemm: residual must "
          f"be an ({m}, {n}) tensor")
    pre = (_dequantized(a, scale_a, scale_a_kind, 0)
           @ _dequantized(b, scale_b, scale_b_kind, 1)).float()
    if bias is not None:
        pre = pre + bias.float()
    out = _activation(activation, "scaled_gemm")(pre)
    if residual is not None:
        out = out + residual.to(out_dtype).float()
    return out.to(out_dtype), (pre.to(out_dtype) if save_pre
                               else pre.new_empty((0, 0), dtype=out_dtype))


STANDINS = {
    "matmul_cuda": matmul_cuda,
    "gemm_cuda": gemm_cuda,
    "activation_backward_cuda": activation_backward_cuda,
    "conv2d_fwd_cuda": conv2d_fwd_cuda,
    "conv2d_dgrad_cuda": conv2d_dgrad_cuda,
    "conv2d_wgrad_cuda": conv2d_wgrad_cuda,
    "attention_fwd_cuda": attention_fwd_cuda,
    "attention_bwd_cuda": attention_bwd_cuda,
    "varlen_attention_fwd_cuda": varlen_attention_fwd_cuda,
    "varlen_attention_bwd_cuda": varlen_attention_bwd_cuda,
    "quantize_fp8_cuda": quantize_fp8_cuda,
    "scaled_gemm_cuda": scaled_gemm_cuda,
}


@contextlib.contextmanager
def enabled():
    """The stand-ins registered for CPU tensors, and the cuda backend available for them,
    until the block ends; yields a Counter of the calls each op receives."""
    calls = collections.Counter()

    def counted(name, function):
        def run(*args):
            calls[name] += 1
            return function(*args)
        return run

    library = torch.library.Library("tilesmith", "IMPL")
    for name, function in STANDINS.items():
        library.impl(name, counted(name, function), "CPU")
    real = backend.unavailable_reason

    def unavailable_reason(name, op, device, dtype=None):
        if name == "cuda" and torch.device(device).type == "cpu":
            if dtype is not None and dtype not in backend.SUPPORTED_DTYPES[op]["cuda"]:
                return f"the cuda backend of {op} does not take {dtype}"
            return None
        return real(name, op, device, dtype)

    backend.unavailable_reason = unavailable_reason
    try:
        yield calls
    finally:
        backend.unavailable_reason = real
        library._destroy()

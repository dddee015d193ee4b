"""Attention: ``torch.nn.functional.scaled_dot_product_attention`` semantics on tilesmith's
flash-style kernels, plus ``attention`` (which also returns the log-sum-exp) and
``varlen_attention`` (packed variable-length batches).

Layers, as for every op family:
  * public functions: validate, apply PyTorch's argument rules, pick a backend;
  * registered ops ``tilesmith::attention_{fwd,bwd}_{triton,cuda}`` and
    ``tilesmith::varlen_attention_{fwd,bwd}_{triton,cuda}`` (fake kernels, autograd whose
    backward calls the bwd op, so torch.compile traces both directions);
  * kernels: kernels/attention_fwd.py, kernels/attention_bwd.py (Triton: every feature) and
    csrc/attention/ (CUDA: head dims multiples of 8 up to 256, fp16/bf16).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os

import torch
from torch.library import triton_op

from ._library import (LIBRARY, MAX_GRID_YZ, autocast_inputs, dot_precision, new_output,
                       register_autocast, wrap_triton)

# Both backends' ops end in (dropout_p, seed): seed is the Philox seed of the call, a
# 1-element int64 tensor on q's device (draw_dropout_seed), None when dropout_p is 0. The
# CUDA forwards then take keys_per_split (_keys_per_split; the Triton ones decide inside).
LIBRARY.define("attention_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, "
               "float scale, float dropout_p, Tensor? seed, int keys_per_split=0) "
               "-> (Tensor, Tensor)")
LIBRARY.define("attention_bwd_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mask, "
               "Tensor out, Tensor lse, bool causal, float scale, bool mask_grad, "
               "float dropout_p, Tensor? seed, Tensor? grad_lse=None) "
               "-> (Tensor, Tensor, Tensor, Tensor)")
LIBRARY.define("varlen_attention_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
               "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
               "float scale, float dropout_p, Tensor? seed, int keys_per_split=0) "
               "-> (Tensor, Tensor)")
LIBRARY.define("varlen_attention_bwd_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
               "Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
               "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
               "float dropout_p, Tensor? seed, Tensor? grad_lse=None) "
               "-> (Tensor, Tensor, Tensor)")

from .. import backend as _backend  # noqa: E402  (loads tilesmith._C after the schemas)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
# PyTorch's own SDPA, by its builtin name: F.scaled_dot_product_attention may be
# tilesmith.nn.patch_sdpa's wrapper, which would route the torch backend back here.
_builtin_sdpa = torch._C._nn.scaled_dot_product_attention


def pytorch_sdpa(query, key, value, **kwargs):
    """PyTorch's own SDPA (the torch backend, and the tests' reference). With no key heads
    (so no query heads either: checked before) the empty result comes from two matmuls:
    torch 2.11's CPU SDPA divides by the head count there, a SIGFPE that ends the process
    (pytorch/pytorch#141219); 2.14 returns early."""
    if key.dim() == 4 and key.shape[1] == 0:
        return torch.matmul(torch.matmul(query, key.transpose(-1, -2)), value)
    # Its flags must be bools: under torch.compile with dynamic shapes a flag computed from
    # shapes (enable_gqa from the head counts) is a SymBool, which it refuses. Branching on
    # it specializes the graph to its value (a guard); bool() would stay symbolic.
    for flag in ("is_causal", "enable_gqa"):
        if flag in kwargs:
            kwargs[flag] = True if kwargs[flag] else False
    return _builtin_sdpa(query, key, value, **kwargs)


# ---- launch helpers -----------------------------------------------------------------------

# Tiles forced by tile_config() (tests): kind ("fwd", "dkdv", "dq") -> triton.Config.
_FORCED_TILES: dict = {}


@contextlib.contextmanager
def tile_config(**configs):
    """Within the block, launch the Triton attention kernels with these tiles instead of
    autotuning: ``tile_config(fwd=cfg, dkdv=cfg, dq=cfg)`` with triton.Config entries of
    kernels/attention_*.py's *_CONFIGS (how every config is tested on its own)."""
    previous = dict(_FORCED_TILES)
    _FORCED_TILES.update(configs)
    try:
        yield
    finally:
        _FORCED_TILES.clear()
        _FORCED_TILES.update(previous)


# Keys per split forced by split_keys() (tests); None: _keys_per_split decides.
_FORCED_SPLIT_KEYS: list = [None]
# Splits are whole multiples of this many keys, which every Triton BLOCK_N (16 .. 128) and
# the CUDA forward's 64 divide.
_SPLIT_GRANULE = 256


@contextlib.contextmanager
def split_keys(keys: int | None):
    """Make the attention forwards split the keys into ranges of ``keys`` whatever the shape,
    as tests do: a multiple of the forward's key block (Triton under the interpreter 16 up to
    128 tokens, else 64; on a GPU 128 covers every tuned tile; CUDA 64). None restores the
    default, 0 never splits."""
    if keys is not None and (isinstance(keys, bool) or not isinstance(keys, int) or keys < 0):
        # (A negative count reached the kernels as such and gave garbage.)
        raise ValueError(f"split_keys: keys must be None or an int >= 0, got {keys!r}")
    previous = _FORCED_SPLIT_KEYS[0]
    _FORCED_SPLIT_KEYS[0] = keys
    try:
        yield
    finally:
        _FORCED_SPLIT_KEYS[0] = previous


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _keys_per_split(q, batch, heads, seqlen_q, seqlen_k) -> int:
    """Keys per split of the attention forward (both backends), 0 for none: on a GPU, only
    where the query blocks (counted at 128 rows) fill at most half of its SMs, in as many
    splits as make about one block per SM, each of at least 512 keys (at most 64 splits)."""
    forced = _FORCED_SPLIT_KEYS[0]
    if forced is not None:
        return forced
    if q.device.type != "cuda":
        return 0
    blocks = batch * heads * -(-seqlen_q // 128)
    splits = min(_sm_count(q.device.index) // max(blocks, 1), seqlen_k // 512, 64)
    if splits < 2:
        return 0
    per_split = -(-seqlen_k // splits)
    return -(-per_split // _SPLIT_GRANULE) * _SPLIT_GRANULE


def _packs_gqa(group_size: int, seqlen_q: int) -> bool:
    """Whether the Triton forward packs each kv head's query heads into one block's rows
    (kernels/attention_fwd.py's PACK_GQA): for grouped-query calls whose query rows would
    not fill one 128-row block per head (decoding, short prompts)."""
    return group_size > 1 and seqlen_q < 128


def _kernel_space(kind: str):
    """(Triton kernel, its autotune configs by head-dim class) for "fwd", "dkdv" or "dq"."""
    from tilesmith.kernels import attention_bwd, attention_fwd

    return {
        "fwd": (attention_fwd.attention_fwd_kernel, attention_fwd.FWD_CONFIGS),
        "dkdv": (attention_bwd.attention_bwd_dkdv_kernel, attention_bwd.DKDV_CONFIGS),
        "dq": (attention_bwd.attention_bwd_dq_kernel, attention_bwd.DQ_CONFIGS),
    }[kind]


@functools.cache
def _tuned_kernel(kind: str, widest: int):
    """``kind``'s kernel autotuned over its configs for head dims up to ``widest``. The key
    holds what changes the best tile: sizes (the sequence length by power of two), the GQA
    group and the compile-time switches (a missing name, e.g. MASK_GRAD outside dq, is
    skipped)."""
    import triton

    kernel, configs = _kernel_space(kind)
    configs = configs[widest]
    if os.environ.get("TILESMITH_TRITON_AUTOTUNE", "full") == "first":
        configs = configs[:1]
    key = ["tune_seqlen", "group_size", "head_dim", "head_dim_v", "MASK_KIND", "CAUSAL",
           "VARLEN", "DROPOUT", "SPLIT", "PACK_GQA", "MASK_GRAD"]
    # Tuning runs the dQ kernel several times: its atomically summed mask gradient restarts
    # from zero before each run.
    reset = ["dmask_ptr"] if kind == "dq" else None
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(kernel)


def _kernel_and_tiles(kind: str, head_dim: int, head_dim_v: int, longest: int):
    """The kernel to launch for ``kind`` and the launch kwargs that fix its tiles: those
    forced by tile_config, the interpreter's small ones, or (on a GPU) only the head-dim
    blocks, the autotuned kernel choosing BLOCK_M/BLOCK_N, warps and stages."""
    from tilesmith.kernels.attention_fwd import INTERPRETING

    block_d = max(16, triton_next_power_of_2(head_dim))
    block_dv = max(16, triton_next_power_of_2(head_dim_v))
    dims = dict(BLOCK_D=block_d, BLOCK_DV=block_dv)
    plain = _kernel_space(kind)[0]
    forced = _FORCED_TILES.get(kind)
    if forced is not None:
        return plain, dict(dims, **forced.kwargs, num_warps=forced.num_warps,
                           num_stages=forced.num_stages)
    if INTERPRETING:
        # The interpreter's cost is per block operation: 16-row tiles test the edges of short
        # sequences, 64-row tiles keep a 1023-token test at seconds instead of a minute.
        block = 16 if longest <= 128 else 64
        return plain, dict(dims, BLOCK_M=block, BLOCK_N=block, num_warps=4, num_stages=1)
    return _tuned_kernel(kind, max(64, block_d, block_dv)), dims


def triton_next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _acc_dtype(dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _lse_dtype(dtype):
    # float64 runs (gradcheck) keep the log-sum-exp in float64 too.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_strides(t):
    """(batch, heads, seq, dim) strides of a (B, H, S, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _packed_strides(t):
    """The same four for a packed (tokens, H, D) tensor: batch stride 0, the sequence's
    first token is added by the kernel from cu_seqlens."""
    return 0, t.stride(1), t.stride(0), t.stride(2)


def _mask_strides(mask):
    """Strides of a 4-D mask whose size-1 dimensions broadcast (stride 0)."""
    if mask is None:
        return 0, 0, 0, 0
    return tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))


def _mask_kind(mask):
    from tilesmith.kernels.attention_fwd import MASK_ADD, MASK_BOOL, MASK_NONE

    if mask is None:
        return MASK_NONE
    return MASK_BOOL if mask.dtype == torch.bool else MASK_ADD


def _mask_pointer(mask, fallback):
    if mask is None:
        return fallback  # never read: MASK_KIND is MASK_NONE
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _common_constexprs(q, mask, causal, varlen, dropout_p):
    from tilesmith.kernels.attention_fwd import INTERPRETING

    return dict(MASK_KIND=_mask_kind(mask), CAUSAL=causal, VARLEN=varlen,
                DROPOUT=dropout_p > 0, UPCAST=INTERPRETING,
                INPUT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=_acc_dtype(q.dtype))


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, rescale) for the kernels: a Philox word w keeps its probability when
    w >= threshold = dropout_p * 2**32, and the kept ones are scaled by 1 / (1 - dropout_p)."""
    if dropout_p <= 0:
        return 0, 1.0
    return min(round(dropout_p * 2**32), 2**32 - 1), 1.0 / (1.0 - dropout_p)


def draw_dropout_seed(device) -> torch.Tensor:
    """The Philox seed of one dropout call, drawn from torch's generator on ``device`` (so
    ``torch.manual_seed`` makes runs repeatable) as a 1-element int64 tensor that stays on
    the device: no host sync, and CUDA-graph replays draw a new one."""
    return torch.randint(2**62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, seqlen_q: int,
                      seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The (batch, heads, seqlen_q, seqlen_k) boolean mask of the probabilities that the
    attention kernels (Triton and cuda) keep for this ``seed`` (see draw_dropout_seed) and
    ``dropout_p``: for tests and debugging (it is as large as the score matrix). Written by
    a Triton kernel."""
    import triton

    from tilesmith.kernels.attention_fwd import dropout_mask_kernel

    fn = "attention_dropout_mask"
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        raise TypeError(f"{fn}: seed must be a 1-element int64 tensor (draw_dropout_seed), got "
                        f"{seed.dtype if isinstance(seed, torch.Tensor) else type(seed)}")
    if min(batch, heads, seqlen_q, seqlen_k) < 0:
        raise ValueError(f"{fn}: sizes must be >= 0, got batch {batch}, heads {heads}, "
                         f"seqlen_q {seqlen_q}, seqlen_k {seqlen_k}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if max(batch, heads) > MAX_GRID_YZ:
        raise ValueError(f"attention_dropout_mask: at most {MAX_GRID_YZ} batch entries and "
                         f"heads (a grid axis each), got batch {batch}, heads {heads}")
    keep = torch.zeros((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8,
                       device=seed.device)
    if keep.numel():
        block = 16 if seed.device.type == "cpu" else 64
        grid = (triton.cdiv(seqlen_q, block), heads, batch)
        dropout_mask_kernel[grid](seed, keep, seqlen_q, seqlen_k, _dropout_args(dropout_p)[0],
                                  keep.stride(1), keep.stride(2), BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


def _new_attention_output(q, head_dim_v):
    """The (batch, heads, seq_q, head_dim_v) output of a dense call, laid out as q where q is
    a (batch, seq, heads, dim) tensor seen as (batch, heads, seq, dim) (its heads stride
    below its sequence stride), as models that project q, k and v together have it and as
    PyTorch's SDPA returns it: out.transpose(1, 2) is then contiguous. Both backends (the
    cuda op's C++ makes the same choice)."""
    batch, heads, seqlen_q = q.shape[:3]
    if q.stride(1) < q.stride(2):
        return new_output((batch, seqlen_q, heads, head_dim_v), like=q).transpose(1, 2)
    return new_output((batch, heads, seqlen_q, head_dim_v), like=q)


def _forward(q, k, v, mask, cu_q, cu_k, batch, seqlen_q, seqlen_k, causal, scale, varlen,
             dropout_p=0.0, seed=None):
    """Shared by the dense and packed forward ops: allocate, launch, return (out, lse)."""
    import triton

    from tilesmith.kernels.attention_fwd import (INTERPRETING, LOG2E,
                                                 attention_split_combine_kernel)

    if varlen:
        total_q, heads, head_dim = q.shape
        heads_kv, head_dim_v = k.shape[1], v.shape[2]
        out = new_output((total_q, heads, head_dim_v), like=q)
        lse = new_output((heads, total_q), like=q, dtype=_lse_dtype(q.dtype))
        layout = _packed_strides
        lse_strides = (0, lse.stride(0))
    else:
        heads, head_dim = q.shape[1], q.shape[3]
        heads_kv, head_dim_v = k.shape[1], v.shape[3]
        out = _new_attention_output(q, head_dim_v)
        lse = new_output((batch, heads, seqlen_q), like=q, dtype=_lse_dtype(q.dtype))
        layout = _dense_strides
        lse_strides = (lse.stride(0), lse.stride(1))
    if out.numel() == 0:
        return out, lse
    longest = max(seqlen_q, seqlen_k)
    kernel, tiles = _kernel_and_tiles("fwd", head_dim, head_dim_v, longest)
    # Packed GQA: a program's rows are (query row, query head) pairs of one kv head.
    group = heads // heads_kv
    pack_gqa = _packs_gqa(group, seqlen_q)
    row_heads, rows_per_head = (heads_kv, seqlen_q * group) if pack_gqa else (heads, seqlen_q)
    # Split over the keys: the kernel writes partials (in lse's precision) for the combine.
    keys_per_split = _keys_per_split(q, batch, row_heads, rows_per_head, seqlen_k)
    block_n = tiles.get("BLOCK_N", 128)  # autotuned: 128 is a multiple of every config's
    if keys_per_split % block_n:
        raise ValueError(f"split_keys: {keys_per_split} keys per split is not a multiple of "
                         f"the forward's {block_n}-key blocks")
    splits = triton.cdiv(seqlen_k, keys_per_split) if keys_per_split else 1
    if splits > 1:
        out_target = torch.empty((splits, *out.shape), dtype=lse.dtype, device=q.device)
        lse_target = torch.empty((splits, *lse.shape), dtype=lse.dtype, device=q.device)
    else:
        out_target, lse_target = out, lse
    out_layout = layout(out_target[0] if splits > 1 else out)
    strides = [layout(t) for t in (q, k, v)] + [_mask_strides(mask), out_layout]

    def grid(meta):
        return (triton.cdiv(rows_per_head, meta["BLOCK_M"]) * splits, row_heads, batch)

    wrap_triton(kernel)[grid](
        q, k, v, _mask_pointer(mask, q), out_target, lse_target, cu_q, cu_k,
        q if seed is None else seed, *[s for group in strides for s in group], *lse_strides,
        heads, group, seqlen_q, seqlen_k, head_dim, head_dim_v, scale * LOG2E,
        *_dropout_args(dropout_p), triton_next_power_of_2(longest),
        keys_per_split, out_target.stride(0), lse_target.stride(0),
        SPLIT=splits > 1, PACK_GQA=pack_gqa,
        **_common_constexprs(q, mask, causal, varlen, dropout_p), **tiles)
    if splits > 1:
        block_m = 16 if INTERPRETING else 64
        wrap_triton(attention_split_combine_kernel)[
            (triton.cdiv(seqlen_q, block_m), heads, batch)](
            out_target, lse_target, out, lse, cu_q, *out_layout, out_target.stride(0),
            *layout(out), *lse_strides, lse_target.stride(0), splits, seqlen_q, head_dim_v,
            VARLEN=varlen, UPCAST=INTERPRETING, ACC_DTYPE=_acc_dtype(q.dtype), BLOCK_M=block_m,
            BLOCK_DV=tiles["BLOCK_DV"], num_warps=4)
    return out, lse


def _backward(grad_out, q, k, v, mask, out, lse, cu_q, cu_k, batch, seqlen_q, seqlen_k,
              causal, scale, mask_grad, varlen, dropout_p=0.0, seed=None, grad_lse=None):
    """Shared by the dense and packed backward ops: (dq, dk, dv, dmask). grad_lse: lse's
    gradient (lse's shape), which folds into delta (a score's gradient is P (dP - delta),
    and lse's adds P grad_lse)."""
    import triton

    from tilesmith.kernels.attention_fwd import LOG2E

    dq = new_output(q.shape, like=q)
    dk = new_output(k.shape, like=k)
    dv = new_output(v.shape, like=v)
    # The additive mask's gradient accumulates (atomically) in fp32 (fp64 for fp64 inputs),
    # in the mask's own (broadcast) shape: a (1, H, S, S) bias gets a (1, H, S, S) gradient,
    # summed over batch. Contiguous whatever the mask's strides: the kernel takes its own.
    dmask = (torch.zeros(mask.shape, dtype=_lse_dtype(q.dtype), device=q.device) if mask_grad
             else q.new_empty(0))
    if varlen:
        heads, head_dim = q.shape[1], q.shape[2]
        heads_kv, head_dim_v = k.shape[1], v.shape[2]
        layout = _packed_strides
        # delta = rowsum(dout * out), laid out like lse: (heads, tokens) (a copy into a new
        # tensor: .t().contiguous() keeps the transposed strides of a single token).
        delta = lse.new_empty(lse.shape)
        delta.copy_((grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1).t())
        if grad_lse is not None:
            delta -= grad_lse.to(lse.dtype)
        lse_strides = (0, lse.stride(0))
    else:
        heads, head_dim = q.shape[1], q.shape[3]
        heads_kv, head_dim_v = k.shape[1], v.shape[3]
        layout = _dense_strides
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(lse.dtype)
        if delta.stride() != lse.stride():  # (out laid out (batch, seq, heads, dim))
            delta = lse.new_empty(lse.shape).copy_(delta)  # into lse's layout
        lse_strides = (lse.stride(0), lse.stride(1))
    # No query rows or no keys: zero gradients. (No query/key head dims alone is not such a
    # case: each row then averages the values, and dV is not zero.)
    if (q.shape[:-1].numel() == 0 or k.shape[:-1].numel() == 0
            or (q.shape[-1] == 0 and v.shape[-1] == 0)):
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    if batch * heads == 0:
        return dq, dk, dv, dmask
    # The kernels index delta with lse's strides.
    assert delta.shape == lse.shape and delta.stride() == lse.stride()
    mask_strides = _mask_strides(mask)
    common = _common_constexprs(q, mask, causal, varlen, dropout_p)
    longest = max(seqlen_q, seqlen_k)
    sizes = (seqlen_q, seqlen_k, head_dim, head_dim_v, scale * LOG2E, scale,
             *_dropout_args(dropout_p), triton_next_power_of_2(longest))
    seed_ptr = q if seed is None else seed
    qkv_strides = [s for t in (q, k, v) for s in layout(t)]
    mask_ptr = _mask_pointer(mask, q)

    def grid_kv(meta):
        return (triton.cdiv(seqlen_k, meta["BLOCK_N"]), heads_kv, batch)

    def grid_q(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)

    kernel, tiles = _kernel_and_tiles("dkdv", head_dim, head_dim_v, longest)
    wrap_triton(kernel)[grid_kv](
        q, k, v, mask_ptr, grad_out, lse, delta, dk, dv, cu_q, cu_k, seed_ptr,
        *qkv_strides, *mask_strides, *layout(grad_out), *lse_strides, *layout(dk), *layout(dv),
        heads_kv, heads // heads_kv, *sizes, **common, **tiles)
    # Without a mask gradient the kernel gets a 1-element stand-in (never written; autotuning
    # zeroes it before each trial, which it must not do to a real input).
    dmask_arg = dmask if mask_grad else torch.zeros(1, dtype=torch.float32, device=q.device)
    kernel, tiles = _kernel_and_tiles("dq", head_dim, head_dim_v, longest)
    wrap_triton(kernel)[grid_q](
        q, k, v, mask_ptr, grad_out, lse, delta, dq, dmask_arg, cu_q, cu_k, seed_ptr,
        *qkv_strides, *mask_strides, *_mask_strides(dmask if mask_grad else None),
        *layout(grad_out), *lse_strides, *layout(dq),
        heads, heads // heads_kv, *sizes, MASK_GRAD=mask_grad, **common, **tiles)
    return dq, dk, dv, dmask


# ---- registered ops -----------------------------------------------------------------------

@triton_op("tilesmith::attention_fwd_triton", mutates_args=())
def _attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None, causal: bool, scale: float,
                          dropout_p: float, seed: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_dropout_seed(dropout_p, seed, q)
    return _forward(q, k, v, mask, q, q, q.shape[0], q.shape[2], k.shape[2], causal, scale,
                    varlen=False, dropout_p=dropout_p, seed=seed)


@triton_op("tilesmith::attention_bwd_triton", mutates_args=())
def _attention_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor,
                          lse: torch.Tensor, causal: bool, scale: float, mask_grad: bool,
                          dropout_p: float, seed: torch.Tensor | None,
                          grad_lse: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_dropout_seed(dropout_p, seed, q)
    _check_grad_lse(grad_lse, lse, "attention backward")
    return _backward(grad_out, q, k, v, mask, out, lse, q, q, q.shape[0], q.shape[2], k.shape[2],
                     causal, scale, mask_grad, varlen=False, dropout_p=dropout_p, seed=seed,
                     grad_lse=grad_lse)


def _check_grad_lse(grad_lse, lse, fn):
    if grad_lse is not None and grad_lse.shape != lse.shape:
        raise ValueError(f"{fn}: grad_lse {tuple(grad_lse.shape)} must have lse's shape "
                         f"{tuple(lse.shape)}")


def _check_dropout_seed(dropout_p, seed, q):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1
                          or seed.device != q.device):
        what = None if seed is None else f"{seed.dtype} {tuple(seed.shape)} on {seed.device}"
        raise ValueError(f"dropout_p > 0 needs seed: a 1-element int64 tensor on {q.device}, "
                         f"got {what}")


@triton_op("tilesmith::varlen_attention_fwd_triton", mutates_args=())
def _varlen_attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                 max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                                 scale: float, dropout_p: float, seed: torch.Tensor | None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_dropout_seed(dropout_p, seed, q)
    return _forward(q, k, v, None, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1,
                    max_seqlen_q, max_seqlen_k, causal, scale, varlen=True,
                    dropout_p=dropout_p, seed=seed)


@triton_op("tilesmith::varlen_attention_bwd_triton", mutates_args=())
def _varlen_attention_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                 max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                                 scale: float, dropout_p: float, seed: torch.Tensor | None,
                                 grad_lse: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_dropout_seed(dropout_p, seed, q)
    _check_grad_lse(grad_lse, lse, "varlen_attention backward")
    dq, dk, dv, _ = _backward(grad_out, q, k, v, None, out, lse, cu_seqlens_q, cu_seqlens_k,
                              cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, causal,
                              scale, False, varlen=True, dropout_p=dropout_p, seed=seed,
                              grad_lse=grad_lse)
    return dq, dk, dv


@torch.library.register_fake("tilesmith::attention_fwd_cuda")
def _attention_fwd_cuda_fake(q, k, v, mask, causal, scale, dropout_p, seed, keys_per_split=0):
    return _new_attention_output(q, q.shape[3]), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("tilesmith::attention_bwd_cuda")
def _attention_bwd_cuda_fake(grad_out, q, k, v, mask, out, lse, causal, scale, mask_grad,
                             dropout_p, seed, grad_lse=None):
    dmask = q.new_empty(mask.shape if mask_grad else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


@torch.library.register_fake("tilesmith::varlen_attention_fwd_cuda")
def _varlen_attention_fwd_cuda_fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p,
                                    seed, keys_per_split=0):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("tilesmith::varlen_attention_bwd_cuda")
def _varlen_attention_bwd_cuda_fake(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                    causal, scale, dropout_p, seed, grad_lse=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, dropout_p, seed = inputs[:8]  # the CUDA op's split: no grad
    out, lse = output
    # The seed goes to the backward as it came: its kernels regenerate the forward's mask.
    ctx.save_for_backward(q, k, v, mask, out, lse, seed)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
    # Unused outputs' gradients come as None, not zeros: most callers never use lse.
    ctx.set_materialize_grads(False)


def _deterministic_mask_grad_shape(q, k, mask):
    """Under ``torch.use_deterministic_algorithms(True)``, the full (batch, heads, seq_q,
    seq_k) shape for a mask that broadcasts, else None. The kernels sum a broadcast mask's
    gradient with atomic adds, in an order that varies between runs; handed the mask
    expanded to the full shape, each of its gradient's elements is written by one kernel
    program, and the sum over the broadcast dimensions is torch's, in a fixed order (an fp32
    buffer of the full size, as PyTorch's memory-efficient backend allocates)."""
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not torch.are_deterministic_algorithms_enabled() or tuple(mask.shape) == full:
        return None
    return full


def _differentiable_backward(ctx, inputs, math_attention, grad_out, grad_lse):
    """attention's backward for a double backward (create_graph=True, a gradient penalty):
    the backward kernels have no derivative of their own, so the attention is computed
    again in PyTorch ops (``math_attention()``: (out, lse) from ``inputs``, with explicit
    scores: memory quadratic in the sequence length, as PyTorch's math backend; with
    dropout, on the mask the kernels drew, which dropout_keep_mask regenerates from the
    call's seed) and differentiated by autograd on the graph. Returns the gradients of
    ``inputs`` (None for those not wanted), then Nones for the op's other arguments."""
    wanted = [i for i in range(len(inputs)) if ctx.needs_input_grad[i]]
    out, lse = math_attention()  # (grad mode is on)
    outputs, grads = [out], [grad_out]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse)
    found = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grads,
                                create_graph=True, allow_unused=True)
    result = [None] * len(ctx.needs_input_grad)
    for i, grad in zip(wanted, found):
        result[i] = grad
    return tuple(result)


def _make_fwd_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask, out, lse, seed = ctx.saved_tensors
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros_like(out)
        if torch.is_grad_enabled():
            keep = (dropout_keep_mask(seed, *q.shape[:3], k.shape[2], ctx.dropout_p)
                    if ctx.dropout_p > 0 else None)
            return _differentiable_backward(
                ctx, (q, k, v, mask),
                lambda: _math_attention(q, k, v, mask, ctx.causal, ctx.scale, keep,
                                        ctx.dropout_p), grad_out, grad_lse)
        mask_grad = bool(mask is not None and ctx.needs_input_grad[3])
        grad_mask_shape = _deterministic_mask_grad_shape(q, k, mask) if mask_grad else None
        mask_seen = mask if grad_mask_shape is None else mask.expand(grad_mask_shape)
        dq, dk, dv, dmask = bwd_op(grad_out, q, k, v, mask_seen, out, lse, ctx.causal,
                                   ctx.scale, mask_grad, ctx.dropout_p, seed, grad_lse)
        dmask = dmask.sum_to_size(mask.shape).to(mask.dtype) if mask_grad else None
        return dq, dk, dv, dmask, *[None] * (len(ctx.needs_input_grad) - 4)
    return backward


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed = inputs[:11]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.max_seqlens = (max_q, max_k)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
    ctx.set_materialize_grads(False)  # as the dense ops': lse's gradient is mostly None


def _make_varlen_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros_like(out)
        if torch.is_grad_enabled():
            keep = (dropout_keep_mask(seed, cu_q.shape[0] - 1, q.shape[1], *ctx.max_seqlens,
                                      ctx.dropout_p) if ctx.dropout_p > 0 else None)
            return _differentiable_backward(
                ctx, (q, k, v),
                lambda: _math_varlen_attention(q, k, v, cu_q, cu_k, *ctx.max_seqlens,
                                               ctx.causal, ctx.scale, keep, ctx.dropout_p),
                grad_out, grad_lse)
        dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens,
                            ctx.causal, ctx.scale, ctx.dropout_p, seed, grad_lse)
        return dq, dk, dv, *[None] * (len(ctx.needs_input_grad) - 3)
    return backward


torch.library.register_autograd("tilesmith::attention_fwd_triton",
                                _make_fwd_backward(torch.ops.tilesmith.attention_bwd_triton),
                                setup_context=_fwd_setup_context)
torch.library.register_autograd("tilesmith::attention_fwd_cuda",
                                _make_fwd_backward(torch.ops.tilesmith.attention_bwd_cuda),
                                setup_context=_fwd_setup_context)
torch.library.register_autograd(
    "tilesmith::varlen_attention_fwd_triton",
    _make_varlen_backward(torch.ops.tilesmith.varlen_attention_bwd_triton),
    setup_context=_varlen_setup_context)
torch.library.register_autograd(
    "tilesmith::varlen_attention_fwd_cuda",
    _make_varlen_backward(torch.ops.tilesmith.varlen_attention_bwd_cuda),
    setup_context=_varlen_setup_context)


# ---- public functions -----------------------------------------------------------------------

def _check_qkv(q, k, v, fn: str, rank: int | None, layout: str) -> None:
    """Types, dtypes, devices and head dims; ranks exactly ``rank``, or at least 2 where it
    is None."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank if rank else t.dim() < 2:
            raise ValueError(f"{fn}: {name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got "
                            f"{t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: query, key and value must have one dtype, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: query, key and value must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: query and key head dims differ ({q.shape[-1]} != "
                         f"{k.shape[-1]}): {_shapes(q, k, v)}")


def _shapes(q, k, v, names=("query", "key", "value")) -> str:
    """The three shapes, for error messages (formatted only when one is raised: this runs
    at every call otherwise)."""
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(names, (q, k, v)))


def _check_heads(num_heads, num_kv_heads, value_heads, enable_gqa, fn, shapes):
    """Head counts that attention takes; ``shapes()`` describes the inputs in an error."""
    if num_kv_heads != value_heads:
        raise ValueError(f"{fn}: key and value must have the same number of heads: "
                         f"{shapes()}")
    if num_heads == num_kv_heads:
        return
    if not enable_gqa:
        raise ValueError(f"{fn}: query has {num_heads} heads and key/value {num_kv_heads}; "
                         f"pass enable_gqa=True for grouped-query attention: {shapes()}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{fn}: the query heads ({num_heads}) must be a multiple of the "
                         f"key/value heads ({num_kv_heads}) for grouped-query attention: "
                         f"{shapes()}")


def _prepare_mask(attn_mask, q, k, fn):
    """The mask as a 4-D view whose dimensions are 1 or full (B, H, Sq, Sk)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{fn}: attn_mask must be a torch.Tensor or None")
    if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"{fn}: attn_mask must be bool, float32 or the query's dtype "
                        f"{q.dtype}, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"{fn}: attn_mask is on {attn_mask.device}, query on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.dim() > 4:
        raise ValueError(f"{fn}: attn_mask has {attn_mask.dim()} dimensions, at most 4")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for size, full in zip(mask.shape, target):
        if size not in (1, full):
            raise ValueError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to (batch, heads, seq_q, seq_k) = {target}")
    return mask


# The cuda kernels' widest head dim; narrower ones (multiples of 8) run zero-padded in the
# head-dim-64, -128 or -256 kernels.
CUDA_MAX_HEAD_DIM = 256
# Dynamic shared memory a block of the head-dim-256 kernels asks for (the dK/dV and dQ
# kernels: csrc/attention/attention_bwd_sm80.cuh's dkdv_smem_bytes / dq_smem_bytes; checked
# against the C++ by test_cuda_emulated). GPUs that allow less (sm_86, sm_89: 99 KiB) run
# head dims above 128 on Triton.
CUDA_D256_SMEM_BYTES = 128 * 1024


def _cuda_shared_memory_short(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    allowed = getattr(props, "shared_memory_per_block_optin", None)
    if allowed is None or allowed >= CUDA_D256_SMEM_BYTES:
        return None
    return (f"the cuda attention kernels for head dims above 128 need "
            f"{CUDA_D256_SMEM_BYTES // 1024} KiB of shared memory per block; {props.name} "
            f"allows {allowed // 1024} KiB")


def kernel_limits(q, v, dropout_p=0.0, mask=None, *, batch=None) -> dict[str, str | None]:
    """Why each of tilesmith's attention backends cannot run this call (None: it can).
    q: (batch, heads, seq, dim), or packed (tokens, heads, dim) holding ``batch`` sequences
    (their count unchecked when not given). The head dims and the batch and head counts
    limit them: both take every mask and every dropout_p (the arguments are part of the
    call's description all the same)."""
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        why = f"head dims above {MAX_HEAD_DIM} are not supported (got {q.shape[-1]})"
        return {"triton": why, "cuda": why}
    batch, heads = (q.shape[0], q.shape[1]) if q.dim() == 4 else (batch or 0, q.shape[1])
    if max(batch, heads) > MAX_GRID_YZ:
        why = (f"the attention kernels take at most {MAX_GRID_YZ} sequences and {MAX_GRID_YZ} "
               f"heads (a CUDA grid axis each), got {batch} and {heads}")
        return {"triton": why, "cuda": why}
    cuda = None
    d = q.shape[-1]
    if d % 8 or not 0 < d <= CUDA_MAX_HEAD_DIM or v.shape[-1] != d:
        cuda = (f"the cuda attention kernels need query, key and value head dims equal, a "
                f"multiple of 8 and at most {CUDA_MAX_HEAD_DIM}, got {d} and {v.shape[-1]}")
    elif d > 128:
        cuda = _cuda_shared_memory_short(q.device)
    return {"triton": None, "cuda": cuda}


def _default_scale(head_dim: int) -> float:
    """1/sqrt(head_dim); any scale for no head dims, whose scores are empty sums (0), so
    each row averages the values, as PyTorch's SDPA gives."""
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


def _group_size(heads: int, kv_heads: int) -> int:
    """Query heads per kv head (no heads at all: 1)."""
    return heads // kv_heads if kv_heads else 1


def _as_batch_heads(query, key, value, attn_mask, enable_gqa, fn):
    """PyTorch's SDPA takes (..., heads, seq, head_dim) tensors of any rank from 2 whose
    leading dimensions broadcast against each other (the heads too: key and value with one
    head serve every query head; without enable_gqa, a query with one head meets every kv
    head); the kernels take (batch, heads, seq, head_dim). Returns query, key, value and
    attn_mask in that form, enable_gqa as the kernels should see it, and the output's
    leading dimensions.

    Broadcast dimensions are expanded (stride 0: read in place, autograd sums their
    gradients); flattening several leading dimensions into the batch is a view, except
    where some of them are broadcast and others not (then a copy). One kv head for several
    query heads runs as grouped-query attention with one group, as it computes the same."""
    _check_qkv(query, key, value, fn, None, "at least 2-D (..., heads, seq, head_dim)")
    if query.dim() == key.dim() == value.dim() == 4:
        # The common call, with nothing to broadcast: the tensors as they are (what the
        # general path below returns for it, in about half its time under cProfile: this
        # runs at every decoding step of every layer).
        heads_q, heads_k = query.shape[1], key.shape[1]
        if (query.shape[0] == key.shape[0] == value.shape[0] and heads_k == value.shape[1]
                and (heads_q == heads_k or 1 not in (heads_q, heads_k))
                and not (isinstance(attn_mask, torch.Tensor) and attn_mask.dim() > 4)):
            return query, key, value, attn_mask, enable_gqa, tuple(query.shape[:2])
    rank = max(query.dim(), key.dim(), value.dim(), 4)

    def leading(t):
        return (1,) * (rank - t.dim()) + tuple(t.shape[:-2])

    (*batch_q, heads_q), (*batch_k, heads_k), (*batch_v, heads_v) = map(
        leading, (query, key, value))
    batch = tuple(batch_q)
    if not batch_q == batch_k == batch_v:
        try:
            batch = tuple(torch.broadcast_shapes(batch_q, batch_k, batch_v))
        except RuntimeError:
            raise ValueError(f"{fn}: batch sizes differ (and do not broadcast): "
                             f"{_shapes(query, key, value)}") from None
    if heads_k != heads_v and 1 in (heads_k, heads_v):
        heads_k = heads_v = max(heads_k, heads_v)  # else _check_heads reports them
    if heads_k == 1 and heads_q > 1:
        enable_gqa = True
    elif heads_q == 1 and heads_k > 1 and not enable_gqa:
        heads_q = heads_k
    out_leading = (*batch, heads_q)[len(batch) + 3 - max(query.dim(), key.dim(), value.dim()):]

    def as_4d(t, heads):
        full = (*batch, heads, *t.shape[-2:])
        if t.shape != full:
            t = t.expand(full)
        return t if t.dim() == 4 else t.reshape(math.prod(batch), *full[-3:])

    query, key, value = as_4d(query, heads_q), as_4d(key, heads_k), as_4d(value, heads_v)
    if isinstance(attn_mask, torch.Tensor) and (
            attn_mask.dim() > 4 or (attn_mask.dim() == 4 and len(batch) > 1)):
        attn_mask = _flatten_mask_batch(attn_mask, batch, fn)
    return query, key, value, attn_mask, enable_gqa, out_leading


def _flatten_mask_batch(mask, batch, fn):
    """A mask of more than 4 dimensions as a 4-D one whose first is the flattened ``batch``
    (or 1): its leading dimensions broadcast against ``batch`` (dimensions beyond the
    scores' rank of size 1, as PyTorch allows). The rest is _prepare_mask's to check."""
    extra = mask.dim() - 3 - len(batch)
    if extra > 0:
        if any(size != 1 for size in mask.shape[:extra]):
            raise ValueError(f"{fn}: attn_mask of shape {tuple(mask.shape)} has more "
                             f"dimensions than the scores ({len(batch) + 3}) that are not 1")
        mask = mask.reshape(mask.shape[extra:])
    mask_batch = (1,) * (len(batch) + 3 - mask.dim()) + tuple(mask.shape[:-3])
    if any(size not in (1, full) for size, full in zip(mask_batch, batch)):
        raise ValueError(f"{fn}: attn_mask of shape {tuple(mask.shape)} does not broadcast "
                         f"over the batch dimensions {batch}")
    rows = mask.shape[-3:]
    if all(size == 1 for size in mask_batch):
        return mask.reshape(1, *rows)
    return mask.expand(*batch, *rows).reshape(math.prod(batch), *rows)


def _with_leading(t, leading):
    """A (batch, heads, ...) result of _as_batch_heads's tensors with the caller's leading
    dimensions."""
    return t if t.shape[:2] == leading else t.reshape(*leading, *t.shape[2:])


def _check_arguments(fn, attn_mask=None, dropout_p=0.0, scale=None, **flags):
    """The types of the arguments that are not q, k and v, checked before anything uses
    them: a string would pass as a true flag, and float("x")'s error names no argument."""
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{fn}: attn_mask must be a torch.Tensor or None, got "
                        f"{type(attn_mask).__name__}")
    for name, flag in flags.items():
        if not isinstance(flag, (bool, torch.SymBool)):
            raise TypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    for name, number in (("dropout_p", dropout_p), ("scale", scale)):
        # (PyTorch's function takes a 0-d tensor for either too.)
        if number is None or isinstance(number, (numbers.Real, torch.SymFloat, torch.SymInt)):
            continue
        if not (isinstance(number, torch.Tensor) and number.dim() == 0
                and not number.is_complex()):
            raise TypeError(f"{fn}: {name} must be a real number, got {number!r}")


def _resolve(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend,
             fn):
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"{fn}: key and value sequence lengths differ: "
                         f"{_shapes(query, key, value)}")
    _check_heads(query.shape[1], key.shape[1], value.shape[1], enable_gqa, fn,
                 lambda: _shapes(query, key, value))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}: pass either attn_mask or is_causal=True, not both (as "
                         "torch.nn.functional.scaled_dot_product_attention)")
    mask = _prepare_mask(attn_mask, query, key, fn)
    scale = _default_scale(query.shape[-1]) if scale is None else float(scale)
    name = _backend.pick("attention", query, backend,
                         kernel_limits(query, value, dropout_p, mask))
    return name, mask, scale


def _kernel_attention(name, query, key, value, mask, causal, scale, dropout_p=0.0):
    """(out, lse) from tilesmith's backend ``name``."""
    batch, heads, seqlen_q = query.shape[:3]
    kv_heads = key.shape[1]
    group = _group_size(heads, kv_heads)
    if name == "cuda" and _packs_gqa(group, seqlen_q) and not causal and dropout_p == 0:
        # Grouped kv heads and short queries (decoding): each kv head's query heads become
        # its query rows, (batch, kv_heads, group * seq_q, dim), so the CUDA kernels read K
        # and V once per kv head rather than once per query head, as the Triton forward's
        # packed blocks do. A view where q's strides allow (always for seq_q = 1), else a
        # copy of the (short) queries. Not causal: a row's position would be lost; not with
        # dropout, whose mask is drawn per query head and row.
        rows_mask = None if mask is None else _grouped_rows_mask(mask, kv_heads, group,
                                                                 seqlen_q)
        if mask is None or rows_mask is not None:
            rows = query.unflatten(1, (kv_heads, group)).flatten(2, 3)
            out, lse = _kernel_attention(name, rows, key, value, rows_mask, False, scale)
            return (out.unflatten(2, (group, seqlen_q)).flatten(1, 2),
                    lse.unflatten(2, (group, seqlen_q)).flatten(1, 2))
    seed = draw_dropout_seed(query.device) if dropout_p > 0 else None
    args = (query, key, value, mask, causal, scale, float(dropout_p), seed)
    if name == "cuda":
        return _cuda_forward(*args)
    return torch.ops.tilesmith.attention_fwd_triton(*args)


def _grouped_rows_mask(mask, kv_heads, group, seqlen_q):
    """A GQA call's (batch, heads, seq_q, seq_k) mask (dimensions 1 or full) for its query
    heads run as (batch, kv_heads, group * seq_q) query rows: the mask itself where it is
    shared by heads and rows, a view (or a copy of the mask's own size) where it varies by
    head and, for seq_q > 1, by row too; None where it would take a copy larger than the
    mask (shared by the heads but not by the rows, or the reverse), which stays unpacked."""
    if mask.shape[1] > 1 and mask.stride(1) == 0:  # expanded over the heads
        mask = mask[:, :1]
    if mask.shape[2] > 1 and mask.stride(2) == 0:  # expanded over the rows
        mask = mask[:, :, :1]
    per_head, per_row = mask.shape[1] > 1, mask.shape[2] > 1
    if not per_head and not per_row:
        return mask
    if per_head and (per_row or seqlen_q == 1):
        return mask.unflatten(1, (kv_heads, group)).flatten(2, 3)
    return None


def _cuda_forward(query, key, value, mask, causal, scale, dropout_p, seed):
    batch, heads, seqlen_q = query.shape[:3]
    split = _keys_per_split(query, batch, heads, seqlen_q, key.shape[2])
    return torch.ops.tilesmith.attention_fwd_cuda(query, key, value, mask, causal, scale,
                                                  dropout_p, seed, split)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *,
                                 backend=None) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on the chosen backend.

    (batch, heads, seq, head_dim) layout, or any rank from 2 (..., heads, seq, head_dim)
    with leading dimensions that broadcast, as PyTorch's; ``is_causal`` aligned top-left
    when seq_q != seq_k (as PyTorch); a boolean ``attn_mask`` keeps the True positions, a
    float one is added to the scores and receives a gradient when it requires one;
    ``enable_gqa`` for grouped- and multi-query attention; a fully masked query row gives
    zeros. ``dropout_p > 0`` drops probabilities inside the kernels, cuda and Triton alike
    (Philox, seeded from torch's generator; the backward regenerates the same mask,
    attention_dropout_mask writes it out); the torch backend calls PyTorch's SDPA with
    dropout_p, PyTorch's own mask."""
    fn = "scaled_dot_product_attention"
    _check_arguments(fn, attn_mask, dropout_p, scale, is_causal=is_causal,
                     enable_gqa=enable_gqa)
    if (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)
            and isinstance(value, torch.Tensor)):  # (else _check_qkv says which is not)
        query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    query, key, value, attn_mask, enable_gqa, leading = _as_batch_heads(
        query, key, value, attn_mask, enable_gqa, fn)
    name, mask, scale = _resolve(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                 enable_gqa, backend, fn)
    if name == "torch":
        # The mask as 4-D: PyTorch's own SDPA (2.14, CPU) fails on a 1-D one.
        out = pytorch_sdpa(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    else:
        out, _ = _kernel_attention(name, query, key, value, mask, is_causal, scale, dropout_p)
    return _with_leading(out, leading)


def attention(query, key, value, *, attn_mask=None, causal=False, scale=None,
              enable_gqa=False, backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``scaled_dot_product_attention`` (no dropout), returning ``(out, lse)``: lse is
    the natural log-sum-exp of each query row's scaled, masked scores, (batch, heads, seq_q)
    (the output's leading dimensions and seq_q) in float32 (-inf for a fully masked row).
    Both are differentiable (lse's gradient folds into the backward's per-row constant, at
    no extra pass)."""
    fn = "attention"
    _check_arguments(fn, attn_mask, 0.0, scale, causal=causal, enable_gqa=enable_gqa)
    if (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)
            and isinstance(value, torch.Tensor)):  # (else _check_qkv says which is not)
        query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    query, key, value, attn_mask, enable_gqa, leading = _as_batch_heads(
        query, key, value, attn_mask, enable_gqa, fn)
    name, mask, scale = _resolve(query, key, value, attn_mask, 0.0, causal, scale, enable_gqa,
                                 backend, fn)
    if name == "torch":
        out, lse = _torch_attention_with_lse(query, key, value, mask, causal, scale)
    else:
        out, lse = _kernel_attention(name, query, key, value, mask, causal, scale)
    return _with_leading(out, leading), _with_leading(lse, leading)


def _autocast(query, key, value, attn_mask):
    """autocast_inputs for q, k, v and a float mask (a bool mask stays bool)."""
    if attn_mask is not None and attn_mask.is_floating_point():
        return autocast_inputs(query, key, value, attn_mask)
    return (*autocast_inputs(query, key, value), attn_mask)


def _torch_attention_with_lse(q, k, v, mask, causal, scale):
    """The torch backend of ``attention``: PyTorch's SDPA for the output, and the
    log-sum-exp from the explicit (quadratic-memory) scores."""
    out = pytorch_sdpa(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                       enable_gqa=_group_size(q.shape[1], k.shape[1]) > 1)
    return out, _torch_logsumexp(q, k, mask, causal, scale)


def _scores_and_logsumexp(q, k, mask, causal, scale):
    """The scaled, masked (batch, heads, seq_q, seq_k) scores in fp32 (fp64 for fp64
    inputs), their rows' log-sum-exp (keepdim; a row that sees no key gets that of zeros,
    with no gradient) and which rows see a key."""
    group = _group_size(q.shape[1], k.shape[1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k.to(compute).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute), keys.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.to(compute))
    # A fully masked row: logsumexp's own backward would give it NaN (exp(-inf - -inf)).
    live = (scores > float("-inf")).any(-1, keepdim=True)  # (no keys: not live)
    return scores, torch.logsumexp(scores.masked_fill(~live, 0.0), dim=-1, keepdim=True), live


def _torch_logsumexp(q, k, mask, causal, scale):
    """(batch, heads, seq_q) log-sum-exp of the scaled, masked scores, in fp32 (fp64 for
    fp64 inputs); -inf, with no gradient, for a row that sees no key."""
    _, lse, live = _scores_and_logsumexp(q, k, mask, causal, scale)
    lse = torch.where(live.squeeze(-1), lse.squeeze(-1), float("-inf"))
    return lse.to(_lse_dtype(q.dtype))


def _math_attention(q, k, v, mask, causal, scale, keep=None, dropout_p=0.0):
    """(out, lse) of attention in differentiable PyTorch ops, for the double backward: a
    fully masked row gives zeros and an lse of -inf, as the kernels do. With dropout,
    ``keep`` is the (batch, heads, seq_q, seq_k) mask of the probabilities kept (the lse is
    that of the scores before dropout, as the kernels')."""
    scores, lse, live = _scores_and_logsumexp(q, k, mask, causal, scale)
    probabilities = torch.exp(scores - lse).masked_fill(~live, 0.0)
    if keep is not None:
        probabilities = probabilities.masked_fill(~keep, 0.0) * (1.0 / (1.0 - dropout_p))
    values = v.to(scores.dtype).repeat_interleave(_group_size(q.shape[1], v.shape[1]), dim=1)
    out = torch.matmul(probabilities, values).to(q.dtype)
    lse = torch.where(live.squeeze(-1), lse.squeeze(-1), float("-inf"))
    return out, lse.to(_lse_dtype(q.dtype))


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     dropout_p=0.0, causal=False, scale=None, return_lse=False, backend=None
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed variable-length sequences: q is (total_q, heads, head_dim), k
    and v (total_k, kv_heads, head_dim[_v]); sequence i owns tokens cu_seqlens[i] to
    cu_seqlens[i + 1] (int32, batch + 1 entries, from 0 to the token count, never
    decreasing: every token belongs to a sequence). ``causal`` is aligned top-left within
    each sequence, as in scaled_dot_product_attention. kv_heads may divide heads
    (grouped-query attention). ``dropout_p`` as in scaled_dot_product_attention (sequence
    i's mask is that of batch entry i of attention_dropout_mask, over its own positions).
    ``max_seqlen_q`` and ``max_seqlen_k`` must be at least the longest sequence's lengths:
    the kernels launch for them. With ``return_lse``, returns ``(out, lse)``: lse is each
    query token's natural log-sum-exp of its scaled (causally masked, not dropped) scores,
    (heads, total_q) in float32 as flash-attn's varlen functions return it (-inf for a
    token that sees no key), and differentiable, as attention's.

    The kernels read cu_seqlens on the device; this function checks them on the host first
    (a ValueError for entries that would read or write past the tensors or leave tokens
    unwritten), which takes a host sync the first time it sees a cu_seqlens tensor and none
    while that tensor is unchanged. Under torch.compile and CUDA graph capture an unseen
    tensor is not checked (no sync is allowed there): wrong entries then give wrong results
    or out-of-bounds accesses, as in flash-attn."""
    fn = "varlen_attention"
    _check_arguments(fn, None, dropout_p, scale, causal=causal, return_lse=return_lse)
    if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        q, k, v = autocast_inputs(q, k, v)
    _check_qkv(q, k, v, fn, 3, "3-D (total_tokens, heads, head_dim)")
    def shapes():
        return _shapes(q, k, v, ("q", "k", "v"))

    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{fn}: k and v token counts differ: {shapes()}")
    _check_heads(q.shape[1], k.shape[1], v.shape[1], True, fn, shapes)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            raise TypeError(f"{fn}: {name} must be a 1-D int32 tensor")
        if cu.device != q.device:
            raise ValueError(f"{fn}: {name} is on {cu.device}, q on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 1:
        raise ValueError(f"{fn}: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must both have batch + 1 entries")
    if not all(hasattr(type(n), "__index__") for n in (max_seqlen_q, max_seqlen_k)):
        raise TypeError(f"{fn}: max_seqlen_q and max_seqlen_k must be ints, got "
                        f"{max_seqlen_q!r} and {max_seqlen_k!r}")
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError(f"{fn}: max_seqlen_q and max_seqlen_k must be >= 0")
    _check_cu_seqlens(fn, "cu_seqlens_q", cu_seqlens_q, "q", q.shape[0], "max_seqlen_q",
                      max_seqlen_q)
    _check_cu_seqlens(fn, "cu_seqlens_k", cu_seqlens_k, "k", k.shape[0], "max_seqlen_k",
                      max_seqlen_k)
    # The kernels read entry i at i: a strided view is copied (batch + 1 integers).
    if cu_seqlens_k is cu_seqlens_q:  # (one copy, still one tensor: see _torch_varlen)
        cu_seqlens_q = cu_seqlens_k = cu_seqlens_q.contiguous()
    else:
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    scale = _default_scale(q.shape[-1]) if scale is None else float(scale)
    name = _backend.pick("attention", q, backend,
                         kernel_limits(q, v, dropout_p, batch=cu_seqlens_q.shape[0] - 1))
    if name == "torch":
        out, lse = _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                 int(max_seqlen_k), causal, scale, dropout_p, return_lse)
        return (out, lse) if return_lse else out
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), causal,
            scale, float(dropout_p), seed)
    if name == "cuda":
        split = _keys_per_split(q, cu_seqlens_q.shape[0] - 1, q.shape[1], int(max_seqlen_q),
                                int(max_seqlen_k))
        out, lse = torch.ops.tilesmith.varlen_attention_fwd_cuda(*args, split)
    else:
        out, lse = torch.ops.tilesmith.varlen_attention_fwd_triton(*args)
    return (out, lse) if return_lse else out


# What the host read of each cu_seqlens tensor: tensor -> (its version counter then, or None
# for an inference tensor, which has none; (first entry, last entry, whether the entries
# never decrease, longest sequence)). Keyed by identity and dropped with the tensor.
_CU_SEQLENS_SEEN = torch.utils.weak.WeakIdKeyDictionary()


def _cu_seqlens_summary(cu):
    """(first, last, nondecreasing, longest) of cu's entries, read on the host once while cu
    is unchanged; None where nothing may be read (tracing, CUDA graph capture)."""
    if torch.compiler.is_compiling():
        return None
    version = None if cu.is_inference() else cu._version
    seen = _CU_SEQLENS_SEEN.get(cu)
    if seen is not None and seen[0] == version:
        return seen[1]
    if (cu.device.type == "meta" or isinstance(cu, torch._subclasses.FakeTensor)
            or (cu.is_cuda and torch.cuda.is_current_stream_capturing())):
        return None
    entries = cu.tolist()  # the host sync
    lengths = [end - start for start, end in zip(entries, entries[1:])]
    summary = (entries[0], entries[-1], min(lengths, default=0) >= 0, max(lengths, default=0))
    _CU_SEQLENS_SEEN[cu] = (version, summary)
    return summary


def _check_cu_seqlens(fn, name, cu, tokens_name, tokens, max_name, max_seqlen):
    """Entries that the kernels could follow past the tensors, or that leave tokens
    unwritten (their rows of the output and gradients would be garbage), raise."""
    summary = _cu_seqlens_summary(cu)
    if summary is None:
        return
    first, last, nondecreasing, longest = summary
    if first != 0 or last != tokens or not nondecreasing:
        raise ValueError(
            f"{fn}: {name} must run from 0 to {tokens_name}'s token count ({tokens}) without "
            f"decreasing, got first entry {first}, last {last}"
            f"{'' if nondecreasing else ', decreasing somewhere'} (put padding tokens in a "
            f"sequence of their own)")
    if longest > max_seqlen:
        raise ValueError(f"{fn}: {max_name}={max_seqlen} is less than the longest sequence "
                         f"in {name} ({longest})")


def _padded_positions(cu, tokens):
    """Each packed token's (sequence, position within it), from cu_seqlens on the device:
    no host read, so no sync and nothing that breaks a torch.compile graph."""
    token = torch.arange(tokens, device=cu.device, dtype=cu.dtype)
    sequence = torch.searchsorted(cu, token, right=True) - 1
    return sequence.long(), (token - cu[sequence]).long()


def _padded(packed, positions, batch, max_seqlen):
    """(batch, heads, max_seqlen, dim) from a packed (tokens, heads, dim) tensor: token t at
    its sequence's row and position, zeros past each sequence's end (on the graph of
    ``packed``, through index_put)."""
    padded = packed.new_zeros(batch, max_seqlen, *packed.shape[1:])
    return padded.index_put(positions, packed).transpose(1, 2)


def _as_padded_batch(q, k, v, cu_q, cu_k, max_q, max_k):
    """q, k, v padded to (batch, heads, max_seqlen, dim), the (batch, 1, 1, max_k) mask of
    each sequence's real keys, and q's token positions (to pack the results again)."""
    batch = cu_q.shape[0] - 1
    positions_q = _padded_positions(cu_q, q.shape[0])
    positions_k = _padded_positions(cu_k, k.shape[0])
    lengths_k = cu_k[1:] - cu_k[:-1]
    real_keys = torch.arange(max_k, device=k.device) < lengths_k[:, None]
    return (_padded(q, positions_q, batch, max_q), _padded(k, positions_k, batch, max_k),
            _padded(v, positions_k, batch, max_k), real_keys[:, None, None, :], positions_q)


def _packed(padded, positions):
    """The inverse of _padded: (tokens, heads, dim) from (batch, heads, max_seqlen, dim)."""
    return padded.transpose(1, 2)[positions]


def _packed_lse(lse, positions):
    """(heads, tokens), varlen's lse layout, from a padded (batch, heads, max_seqlen) lse."""
    return _packed(lse[..., None], positions)[..., 0].t()


def _math_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, keep=None,
                           dropout_p=0.0):
    """(out, lse) of varlen_attention in differentiable PyTorch ops, for the double backward:
    _math_attention on the batch padded to max_seqlen_q x max_seqlen_k, where each
    sequence's causal alignment is top-left as in the packed one; with dropout, ``keep``
    (dropout_keep_mask at that size) applies as it is: sequence i's positions are those of
    batch entry i."""
    qp, kp, vp, real_keys, positions_q = _as_padded_batch(q, k, v, cu_q, cu_k, max_q, max_k)
    out, lse = _math_attention(qp, kp, vp, real_keys, causal, scale, keep, dropout_p)
    return _packed(out, positions_q), _packed_lse(lse, positions_q)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p=0.0,
                  with_lse=False):
    """The torch backend: one call of PyTorch's SDPA on the batch padded to max_seqlen_q x
    max_seqlen_k, with a mask of each sequence's real keys (and of the causal triangle:
    then a bool tensor of batch x max_seqlen_q x max_seqlen_k), or, for causal
    self-attention (``cu_q is cu_k``), is_causal alone. (out, lse): lse (heads, total_q)
    from the explicit scores where with_lse, else None."""
    qp, kp, vp, real_keys, positions_q = _as_padded_batch(q, k, v, cu_q, cu_k, max_q, max_k)
    enable_gqa = _group_size(q.shape[1], k.shape[1]) > 1
    if causal and cu_q is cu_k:
        # Causal self-attention over one packing: a real query sees only keys at or before
        # its own position, all real, so the causal triangle alone masks the padding.
        out = pytorch_sdpa(qp, kp, vp, dropout_p=dropout_p, is_causal=True, scale=scale,
                           enable_gqa=enable_gqa)
    else:
        # A sequence with no keys attends to its padding (zeros) and its output is zeroed
        # after: no row is fully masked, which PyTorch's SDPA backends and versions have
        # answered differently (zeros, NaN).
        no_keys = (cu_k[1:] == cu_k[:-1])[:, None, None, None]
        mask = real_keys | no_keys
        if causal:  # SDPA takes is_causal or a mask, not both
            mask = mask & torch.ones(max_q, max_k, dtype=torch.bool, device=q.device).tril()
        out = pytorch_sdpa(qp, kp, vp, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                           enable_gqa=enable_gqa).masked_fill(no_keys, 0.0)
    lse = None
    if with_lse:
        lse = _packed_lse(_torch_logsumexp(qp, kp, real_keys, causal, scale), positions_q)
    return _packed(out, positions_q), lse


register_autocast("attention_fwd_triton")
register_autocast("attention_fwd_cuda")
register_autocast("varlen_attention_fwd_cuda")
register_autocast("varlen_attention_fwd_triton")

"""attention: tilesmith's kernels against PyTorch's SDPA backends (cuDNN, flash,
memory-efficient), same run, on the flash-attention protocol: batch x seqlen = 16k tokens,
heads x head_dim = 2048, seqlen 512..16k, head dim 64/128, causal or not; forward, backward
and forward+backward, bf16.

    python -m bench.attention [--quick] [--out DIR]

FLOPs: forward 4·B·H·S²·D (halved when causal), backward 2.5x forward. Peak memory is the
extra memory one call allocates; the quadratic math backend is shown where it fits. Training
with dropout: tilesmith's cuda and Triton kernels against SDPA's flash backend (the one of
PyTorch's fused backends that takes dropout), forward+backward, dropout_p = 0.1. Masks:
a learnable additive bias per head (1, H, S, S) with its gradient, and a bool key-padding
mask (B, 1, 1, S), forward+backward, against SDPA's memory-efficient backend (the one that
takes both, and the bias's gradient) and its cuDNN backend where it accepts the mask.
Decoding (full sweep only): one query row over a cache of 8k-64k keys, forward, against
SDPA's flash backend (which splits the keys, as the Triton forward does there).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tilesmith
from bench import harness
from tilesmith import testing

TOKENS = 16384
WIDTH = 2048
# The sweeps, full and quick (make gpu-report's ten minutes go to the targets first).
SEQLENS = {"full": [512, 1024, 2048, 4096, 8192, 16384], "quick": [1024, 4096, 16384]}
HEAD_DIMS = {"full": [64, 128], "quick": [128]}
DROPOUT_SEQLENS = {"full": [1024, 4096, 16384], "quick": [4096]}  # head dim 128
MASK_SEQLENS = {"full": [1024, 2048, 4096], "quick": []}  # head dim 128
# Decoding, 32 query heads over 32 kv heads and (Llama-style GQA) over 8:
# (batch, keys, kv heads, key padding mask)
DECODE_CASES = {"full": [(1, 8192, 32, False), (1, 65536, 32, False), (8, 8192, 32, False),
                         (1, 8192, 8, False), (8, 8192, 8, False), (8, 8192, 8, True)],
                "quick": []}
TORCH_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                  "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                  "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}
MATH_MAX_SEQLEN = 2048  # its (B, H, S, S) scores: beyond this the point is made
ERROR_ROWS = 128


def _contender(name):
    """(fn(q, k, v, causal, mask=None) -> out) for a tilesmith backend or one SDPA backend."""
    if name in TORCH_BACKENDS:
        def run(q, k, v, causal, mask=None):
            with sdpa_kernel(TORCH_BACKENDS[name]):
                return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal,
                                                      enable_gqa=k.shape[1] != q.shape[1])
        return run
    return lambda q, k, v, causal, mask=None: tilesmith.ops.scaled_dot_product_attention(
        q, k, v, mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1], backend=name)


def _refuses(name, fn, *args) -> bool:
    """Whether SDPA backend ``name`` refuses ``fn(*args)`` (this shape, mask or GPU): it sits
    out, as SDPA's dispatcher would pass it over. Our backends never sit out: a call of
    theirs that raises is a failure, reported in its row (harness.contender)."""
    if name not in TORCH_BACKENDS:
        return False
    try:
        fn(*args)
    except RuntimeError as exc:
        print(f"  {name}: {str(exc).splitlines()[0][:100]}")
        return True
    return False


def _measure(fn, q, k, v, causal, mode):
    out = fn(q, k, v, causal)
    grad = torch.randn_like(out)
    if mode == "fwd":
        call = lambda: fn(q, k, v, causal)  # noqa: E731
    elif mode == "bwd":
        call = lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)  # noqa: E731
    else:
        call = lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad)  # noqa: E731
    return harness.median_ms(call), harness.peak_memory(call)


def run(quick: bool = False, backends=("triton", "cuda"), checkpoint=None, rows=None):
    rows = [] if rows is None else rows
    sweep = "quick" if quick else "full"
    dtype = torch.bfloat16
    for head_dim in HEAD_DIMS[sweep]:
        heads = WIDTH // head_dim
        for seqlen in SEQLENS[sweep]:
            batch = TOKENS // seqlen
            for causal in (False, True):
                q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype,
                                       requires_grad=True) for _ in range(3))
                ref = F.scaled_dot_product_attention(
                    q[:1, :1, :ERROR_ROWS].double(), k[:1, :1].double(), v[:1, :1].double(),
                    is_causal=causal) if not causal else None
                flops_fwd = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
                shape = {"B": batch, "H": heads, "S": seqlen, "D": head_dim}
                # (label, backend, hopper_kernels switches): on an H100 "cuda" (wgmma forward) and
                # "cuda-sm80" (mma.sync throughout) both run.
                contenders = list(harness.contenders("attention", backends, q.device, dtype))
                contenders += [(name, name, {}) for name in TORCH_BACKENDS]
                timings = {}
                for name, backend, switches in contenders:
                    if name == "sdpa_math" and seqlen > MATH_MAX_SEQLEN:
                        continue
                    fn = _contender(backend)
                    if _refuses(name, fn, q, k, v, causal):
                        continue
                    err = None
                    for mode, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
                        with (harness.contender(rows, op="attention", mode=mode, backend=name,
                                                baseline="sdpa_cudnn", dtype="bfloat16",
                                                shape=dict(shape, causal=causal)),
                              tilesmith.backend.hopper_kernels(**switches)):  # outside timing
                            if mode == "fwd" and ref is not None:
                                err = testing.rel_error(fn(q[:1, :1, :ERROR_ROWS], k[:1, :1],
                                                           v[:1, :1], causal), ref)
                            ms, mem = _measure(fn, q, k, v, causal, mode)
                            timings[(name, mode)] = (ms, mem, flops_fwd * factor, err)
                for (name, mode), (ms, mem, flops, err) in timings.items():
                    base = timings.get(("sdpa_cudnn", mode))
                    base_ms = base[0] if base else None
                    rows.append(harness.Row(
                        op="attention", mode=mode, backend=name,
                        baseline="sdpa_cudnn" if base else "none", dtype="bfloat16",
                        shape=dict(shape, causal=causal), ms=ms, tflops=flops / ms / 1e9,
                        baseline_ms=base_ms, ratio=base_ms / ms if base_ms else None,
                        rel_err=err, peak_mem_bytes=mem, joules=None))
                print(f"attention D={head_dim} S={seqlen} causal={causal}: " + ", ".join(
                    f"{n}/{m} {t[0]:.2f} ms" for (n, m), t in timings.items() if m == "fwd+bwd"),
                    flush=True)
                if checkpoint:
                    checkpoint(rows)
                del q, k, v
    for seqlen in DROPOUT_SEQLENS[sweep]:
        _dropout_row(rows, seqlen, 128, dtype, backends)
        if checkpoint:
            checkpoint(rows)
    for seqlen in MASK_SEQLENS[sweep]:
        for mask_kind in ("bias_grad", "key_padding"):
            _mask_row(rows, seqlen, 128, dtype, mask_kind, backends)
            if checkpoint:
                checkpoint(rows)
    for batch, seqlen, kv_heads, padded in DECODE_CASES[sweep]:
        _decode_row(rows, batch, seqlen, 128, dtype, backends, kv_heads=kv_heads,
                    padded=padded)
        if checkpoint:
            checkpoint(rows)
    return rows


def _decode_row(rows, batch, seqlen, head_dim, dtype, backends, heads=32, kv_heads=32,
                padded=False):
    """Forward of one query row per (batch, head) over `seqlen` keys: few query blocks for
    the GPU's SMs, where both forwards split the keys (and read each kv head's keys once
    for its whole group of query heads). Against SDPA's flash backend; `padded`: the
    sequences' caches filled to different lengths, a (batch, 1, 1, seqlen) boolean key
    padding mask, against SDPA's memory-efficient backend (flash takes no mask)."""
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, seqlen, head_dim, device="cuda", dtype=dtype)
            for _ in range(2))
    mask = None
    if padded:  # lengths from seqlen / 4 up to seqlen
        lengths = torch.linspace(seqlen // 4, seqlen, batch, device="cuda").long()
        mask = (torch.arange(seqlen, device="cuda") < lengths[:, None]).view(batch, 1, 1, -1)
    group = heads // kv_heads
    first = None if mask is None else mask[:1]
    ref = F.scaled_dot_product_attention(q[:1, :group].double(), k[:1, :1].double(),
                                         v[:1, :1].double(), first, enable_gqa=True)
    contenders = list(harness.contenders("attention", backends, q.device, dtype))
    contenders += [(name, name, {}) for name in TORCH_BACKENDS if name != "sdpa_math"]
    baseline = "sdpa_efficient" if padded else "sdpa_flash"
    shape = {"B": batch, "H": heads, "Hkv": kv_heads, "Sq": 1, "Sk": seqlen, "D": head_dim}
    if padded:
        shape["mask"] = "key_padding"
    timings = {}
    for name, backend, switches in contenders:
        fn = _contender(backend)
        if _refuses(name, fn, q[:1, :group], k[:1, :1], v[:1, :1], False, first):
            continue
        with (harness.contender(rows, op="attention", mode="decode", backend=name,
                                baseline=baseline, dtype=str(dtype).removeprefix("torch."),
                                shape=shape),
              tilesmith.backend.hopper_kernels(**switches)):
            err = testing.rel_error(fn(q[:1, :group], k[:1, :1], v[:1, :1], False, first), ref)
            timings[name] = (harness.median_ms(lambda: fn(q, k, v, False, mask)), err)
    base_ms = timings.get(baseline, (None,))[0]
    flops = 4 * batch * heads * seqlen * head_dim
    for name, (ms, err) in timings.items():
        rows.append(harness.Row(
            op="attention", mode="decode", backend=name,
            baseline=baseline if base_ms else "none", dtype=str(dtype).removeprefix("torch."),
            shape=shape, ms=ms,
            tflops=flops / ms / 1e9, baseline_ms=base_ms, ratio=base_ms / ms if base_ms else None,
            rel_err=err, peak_mem_bytes=None, joules=None))
    print(f"attention decode B={batch} Hkv={kv_heads} Sk={seqlen}"
          f"{' key padding mask' if padded else ''}: " + ", ".join(
              f"{n} {t[0]:.3f} ms" for n, t in timings.items()), flush=True)


def _training_rows(rows, what, shape, step, torch_backends, backends, dtype):
    """fwd+bwd rows of step(backend) -> grads for our backends (on an H100 "cuda", wgmma,
    and "cuda-sm80", mma.sync) and the given SDPA backends, against the first of those."""
    contenders = [(name, name, {}) for name in torch_backends]
    contenders += harness.contenders("attention", backends, torch.device("cuda"), dtype)
    baseline = torch_backends[0]
    timings = {}
    for name, backend, switches in contenders:
        if _refuses(name, step, backend):
            continue
        with (harness.contender(rows, op="attention", mode="fwd+bwd", backend=name,
                                baseline=baseline, dtype="bfloat16", shape=shape),
              tilesmith.backend.hopper_kernels(**switches)):  # set outside the timing
            step(backend)
            timings[name] = (harness.median_ms(lambda: step(backend)),
                             harness.peak_memory(lambda: step(backend)))
    base_ms = timings.get(baseline, (None,))[0]
    flops = 3.5 * 4 * shape["B"] * shape["H"] * shape["S"] ** 2 * shape["D"]
    for name, (ms, mem) in timings.items():
        rows.append(harness.Row(
            op="attention", mode="fwd+bwd", backend=name,
            baseline=baseline if base_ms else "none", dtype="bfloat16", shape=shape, ms=ms,
            tflops=flops / ms / 1e9, baseline_ms=base_ms,
            ratio=base_ms / ms if base_ms else None, rel_err=None, peak_mem_bytes=mem,
            joules=None))
    print(f"attention {what} D={shape['D']} S={shape['S']}: " + ", ".join(
        f"{n} {t[0]:.2f} ms" for n, t in timings.items()), flush=True)


def _inputs(seqlen, head_dim, dtype):
    batch, heads = TOKENS // seqlen, WIDTH // head_dim
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype,
                           requires_grad=True) for _ in range(3))
    shape = {"B": batch, "H": heads, "S": seqlen, "D": head_dim, "causal": False}
    return q, k, v, shape


def _grads(backend, leaves, grad, **kwargs):
    """The gradients of SDPA(q, k, v, **kwargs) (leaves: q, k, v and any other input whose
    gradient is wanted) on an SDPA backend or one of ours."""
    q, k, v = leaves[:3]
    if backend in TORCH_BACKENDS:
        with sdpa_kernel(TORCH_BACKENDS[backend]):
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        out = tilesmith.ops.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    return torch.autograd.grad(out, leaves, grad)


def _dropout_row(rows, seqlen, head_dim, dtype, backends, dropout_p=0.1):
    q, k, v, shape = _inputs(seqlen, head_dim, dtype)
    grad = torch.randn_like(q)
    _training_rows(rows, f"dropout={dropout_p}", dict(shape, dropout_p=dropout_p),
                   lambda backend: _grads(backend, (q, k, v), grad, dropout_p=dropout_p),
                   ["sdpa_flash"], backends, dtype)


def _mask_row(rows, seqlen, head_dim, dtype, mask_kind, backends):
    """fwd+bwd with a mask: "bias_grad", a learnable (1, H, S, S) additive bias whose gradient
    is taken too; "key_padding", a bool (B, 1, 1, S) mask dropping the last quarter of the
    keys of every other sequence."""
    q, k, v, shape = _inputs(seqlen, head_dim, dtype)
    batch, heads = shape["B"], shape["H"]
    if mask_kind == "bias_grad":
        mask = torch.randn(1, heads, seqlen, seqlen, device="cuda", dtype=dtype,
                           requires_grad=True)
        leaves = (q, k, v, mask)
    else:
        kept = torch.full((batch,), seqlen, device="cuda")
        kept[1::2] = seqlen - seqlen // 4
        mask = (torch.arange(seqlen, device="cuda") < kept.view(-1, 1)).view(batch, 1, 1, seqlen)
        leaves = (q, k, v)
    grad = torch.randn_like(q)
    _training_rows(rows, f"mask={mask_kind}", dict(shape, mask=mask_kind),
                   lambda backend: _grads(backend, leaves, grad, attn_mask=mask),
                   ["sdpa_efficient", "sdpa_cudnn"], backends, dtype)


def main():
    harness.script_main(__doc__, "attention", run, plot_title="attention vs SDPA cuDNN (same run)")


if __name__ == "__main__":
    main()

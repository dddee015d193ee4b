"""Every tilesmith CUDA kernel once, on small odd shapes, forward and backward, each result
checked against PyTorch: the workload tools/sanitize.sh runs under compute-sanitizer
(memcheck, racecheck, synccheck). Small on purpose: racecheck slows kernels a thousandfold.

    python tools/sanitize_cuda.py               (exit 1 if any result is off)
    python tools/sanitize_cuda.py --tma-probe   (the TMA-fed kernels only)

TILESMITH_SMOKE_DEVICE=cpu runs the same calls on CPU tensors, for tests/test_cuda_glue.py,
where the cuda ops are PyTorch stand-ins: the script's own mistakes then show up in CI
rather than in the first minutes of a GPU run.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import tilesmith
from tilesmith import testing
from tilesmith.ops.gemm import torch_activation

FAILURES = []
DEVICE = torch.device(os.environ.get("TILESMITH_SMOKE_DEVICE", "cuda"))


def synchronize():
    if DEVICE.type == "cuda":
        synchronize()


def check(name, got, want, bar=2e-2):
    err = testing.rel_error(got, want)
    ok = err <= bar
    print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {err:.2e}", flush=True)
    if not ok:
        FAILURES.append(name)


def check_exact(name, same):
    print(f"{'ok  ' if same else 'FAIL'} {name}: {'bit-exact' if same else 'bits differ'}",
          flush=True)
    if not same:
        FAILURES.append(name)


def check_matmul(kernel_sets):
    """matmul in the four layouts (rows of 8-element multiples: 128- and 256-wide wgmma
    tiles) and a batch with b broadcast (the TMA's batch coordinate, a persistent block
    walking tiles of both entries), under hopper_kernels(**kernels) for each set."""
    dev, bf16 = DEVICE, torch.bfloat16
    for kernels in kernel_sets:
        label = ",".join(f"{key}={value}" for key, value in kernels.items()) or "default"
        for ta in (False, True):
            for tb in (False, True):
                for n in (88, 264):
                    a = torch.randn(70, 136, device=dev, dtype=bf16)
                    b = torch.randn(136, n, device=dev, dtype=bf16)
                    a = a.t().contiguous().t() if ta else a
                    b = b.t().contiguous().t() if tb else b
                    with tilesmith.backend.hopper_kernels(**kernels):
                        out = tilesmith.ops.matmul(a, b, backend="cuda")
                    check(f"matmul {label} ta={ta} tb={tb} n={n}", out, a.double() @ b.double())
        a = torch.randn(3, 200, 72, device=dev, dtype=bf16)
        b = torch.randn(72, 136, device=dev, dtype=bf16)
        with tilesmith.backend.hopper_kernels(**kernels):
            out = tilesmith.ops.matmul(a, b, backend="cuda")
        check(f"matmul {label} batch of 3, b broadcast", out, a.double() @ b.double())


def check_scaled_gemm(kernel_sets):
    """scaled_gemm (sm_90a only) with row-wise and per-block scales, n = 200 (128-wide tiles)
    and 264 (256-wide where the scales allow), under hopper_kernels(**kernels) for each set."""
    quant = testing.quantize_fp8_reference
    a = torch.randn(130, 272, device=DEVICE)
    for kernels in kernel_sets:
        label = ",".join(f"{key}={value}" for key, value in kernels.items()) or "default"
        for n in (200, 264):
            w = torch.randn(n, 272, device=DEVICE)
            for granularity in ("row", "block"):
                if granularity == "row":
                    qa, sa = quant(a, torch.float8_e4m3fn, "row")
                    qw, sw = quant(w, torch.float8_e4m3fn, "row")
                else:
                    qa, sa = quant(a, torch.float8_e4m3fn, "block", 1, 128)
                    qw, sw = quant(w, torch.float8_e4m3fn, "block2d", 128, 128)
                with tilesmith.backend.hopper_kernels(**kernels):
                    out = tilesmith.ops.scaled_gemm(qa, qw.t(), sa, sw.t(),
                                                    out_dtype=torch.float32, backend="cuda")
                ref = testing.scaled_gemm_reference(qa, qw.t(), sa, sw.t())
                check(f"scaled_gemm {label} {granularity} n={n}", out, ref, bar=1e-5)
                # The epilogue: gelu, then a residual read through its row stride.
                residual = torch.randn(130, n + 8, device=DEVICE)[:, :n]
                with tilesmith.backend.hopper_kernels(**kernels):
                    out = tilesmith.ops.scaled_gemm(qa, qw.t(), sa, sw.t(), activation="gelu",
                                                    residual=residual, out_dtype=torch.float32,
                                                    backend="cuda")
                check(f"scaled_gemm {label} {granularity} n={n} gelu+residual", out,
                      torch_activation(ref, "gelu") + residual.double(), bar=1e-5)


def fp8_runs_here() -> bool:
    return tilesmith.backend.unavailable_reason("cuda", "fp8", DEVICE,
                                                torch.float8_e4m3fn) is None


def check_attention(kernel_sets):
    """attention at every kernel head dim, causal with seq_q != seq_k, GQA, forward and
    backward, under hopper_kernels(**kernels) for each set (520 keys: more key blocks than
    the TMA-fed forward has stages)."""
    dev, bf16 = DEVICE, torch.bfloat16
    for kernels in kernel_sets:
        label = ",".join(f"{key}={value}" for key, value in kernels.items()) or "default"
        for d, causal, (sq, sk), heads_kv in ((64, False, (70, 90), 2),
                                              (128, True, (100, 40), 1),
                                              (64, True, (33, 150), 4),
                                              (128, False, (130, 520), 2),
                                              (256, True, (70, 100), 2),
                                              (160, False, (65, 129), 1)):
            q = torch.randn(2, 4, sq, d, device=dev, dtype=bf16, requires_grad=True)
            k = torch.randn(2, heads_kv, sk, d, device=dev, dtype=bf16, requires_grad=True)
            v = torch.randn(2, heads_kv, sk, d, device=dev, dtype=bf16, requires_grad=True)
            with tilesmith.backend.hopper_kernels(**kernels):
                out = tilesmith.ops.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, enable_gqa=True, backend="cuda")
                grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
            ref = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
            ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
            name = f"attention {label} d={d} causal={causal} {sq}x{sk}"
            check(name, out, ref)
            for grad_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
                check(f"{name} {grad_name}", got, want, bar=5e-2)


def check_varlen_attention(kernel_sets, split=False):
    """varlen attention on packed sequences of 37, 0 and 70 tokens, causal, GQA, forward and
    backward, under hopper_kernels(**kernels) for each set (on an H100 at the defaults the
    TMA-fed forward, one tile map over all the tokens); with `split`, also the forward split
    over the keys in 64-key ranges (the first sequence's second split is empty)."""
    dev, bf16 = DEVICE, torch.bfloat16
    cu = torch.tensor([0, 37, 37, 107], device=dev, dtype=torch.int32)
    q = torch.randn(107, 4, 64, device=dev, dtype=bf16, requires_grad=True)
    k = torch.randn(107, 2, 64, device=dev, dtype=bf16, requires_grad=True)
    v = torch.randn(107, 2, 64, device=dev, dtype=bf16, requires_grad=True)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = tilesmith.ops.varlen_attention(*leaves, cu, cu, 70, 70, causal=True, backend="torch")
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for kernels in kernel_sets:
        label = ",".join(f"{key}={value}" for key, value in kernels.items()) or "default"
        with tilesmith.backend.hopper_kernels(**kernels):
            out = tilesmith.ops.varlen_attention(q, k, v, cu, cu, 70, 70, causal=True,
                                                 backend="cuda")
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        check(f"varlen attention {label}", out, ref)
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
            check(f"varlen attention {label} {name}", got, want, bar=5e-2)
    if split:
        with tilesmith.ops.attention_split_keys(64):
            out = tilesmith.ops.varlen_attention(q, k, v, cu, cu, 70, 70, causal=True,
                                                 backend="cuda")
        check("varlen attention split over keys", out, ref)


def probe_tma_kernels() -> int:
    """The TMA kernels alone, at their defaults (tools/gpu_report.sh runs this first, in a
    process of its own, and runs the rest with the TMA kernels off if it fails or hangs)."""
    torch.manual_seed(0)
    check_matmul(({},))
    check_attention(({},))
    check_varlen_attention(({},))
    if fp8_runs_here():
        check_scaled_gemm(({},))
    synchronize()
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all ok")
    return 1 if FAILURES else 0


def main() -> int:
    torch.manual_seed(0)
    dev, bf16 = DEVICE, torch.bfloat16

    # matmul / gemm: the four layouts, odd sizes, a misaligned view (element-wise loads); on
    # an H100 on each wgmma kernel (TMA and cp.async) and on the sm_80 ones.
    check_matmul(({}, {"tma": False}, {"enabled": False}))
    base = torch.randn(33 * 24 + 1, device=dev, dtype=torch.float16)
    a = base[1:].view(33, 24)
    b = torch.randn(24, 17, device=dev, dtype=torch.float16)
    check("matmul misaligned fp16", tilesmith.ops.matmul(a, b, backend="cuda"),
          a.double() @ b.double())
    # gemm through bias + gelu, forward and backward: the activation backward's 16-byte
    # (n = 136) and element-wise (n = 130) paths, with the bias gradient it reduces.
    for n in (130, 136):
        a = torch.randn(65, 72, device=dev, dtype=bf16, requires_grad=True)
        b = torch.randn(72, n, device=dev, dtype=bf16, requires_grad=True)
        bias = torch.randn(n, device=dev, dtype=bf16, requires_grad=True)
        out = tilesmith.ops.gemm(a, b, bias=bias, activation="gelu", backend="cuda")
        grads = torch.autograd.grad(out.float().square().sum(), (a, b, bias))
        leaves = [t.detach().double().requires_grad_(True) for t in (a, b, bias)]
        ref = F.gelu(leaves[0] @ leaves[1] + leaves[2])
        check(f"gemm bias+gelu n={n}", out, ref)
        ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
        for name, got, want in zip(("a", "b", "bias"), grads, ref_grads):
            check(f"gemm bias+gelu n={n} grad_{name}", got, want)

    # attention: every kernel head dim, causal with seq_q != seq_k, GQA, forward and backward;
    # on an H100 the forward on each wgmma kernel (TMA and cp.async).
    check_attention(({}, {"tma": False}))

    # attention with an additive (1, heads, seq_q, seq_k) mask in the queries' dtype and in
    # fp32 (read as it is, 4 bytes an entry), and its gradient, through a loss of out and
    # lse: on Hopper through the wgmma kernels (several query and key blocks) and the sm_80
    # ones.
    q = torch.randn(2, 2, 150, 64, device=dev, dtype=bf16, requires_grad=True)
    k = torch.randn(2, 2, 260, 64, device=dev, dtype=bf16, requires_grad=True)
    v = torch.randn(2, 2, 260, 64, device=dev, dtype=bf16, requires_grad=True)
    lse_weights = torch.randn(2, 2, 150, device=dev)
    for mask_dtype in (bf16, torch.float32):
        bias = torch.randn(1, 2, 150, 260, device=dev, dtype=mask_dtype, requires_grad=True)
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
        scores = leaves[0] @ leaves[1].transpose(-1, -2) * 64 ** -0.5 + leaves[3]
        ref = torch.softmax(scores, -1) @ leaves[2]
        ref_lse = torch.logsumexp(scores, -1)
        ref_grads = torch.autograd.grad(ref.square().sum() + (ref_lse * lse_weights).sum(),
                                        leaves)
        for hopper in (True, False):
            what = f"attention additive {mask_dtype} mask hopper={hopper}"
            with tilesmith.backend.hopper_kernels(hopper):
                out, lse = tilesmith.ops.attention(q, k, v, attn_mask=bias, backend="cuda")
                grads = torch.autograd.grad(
                    out.float().square().sum() + (lse * lse_weights).sum(), (q, k, v, bias))
            check(what, out, ref)
            check(f"{what} lse", lse, ref_lse)
            for name, got, want in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
                check(f"{what} {name}", got, want, bar=5e-2)

    # attention with dropout (against the mask's definition, testing's plain-PyTorch
    # Philox), causal, at head dim 80: zero-padded in the head-dim-128 kernels; on Hopper
    # through the wgmma kernels and the sm_80 ones.
    q, k, v = (torch.randn(2, 2, 70, 80, device=dev, dtype=bf16, requires_grad=True)
               for _ in range(3))
    seed, dropout_p, scale = 0x5EED, 0.2, 80 ** -0.5
    keep = testing.attention_dropout_keep_reference(seed, 2, 2, 70, 70, dropout_p).to(dev)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    causal = torch.ones(70, 70, dtype=torch.bool, device=dev).tril()
    probs = torch.softmax((leaves[0] @ leaves[1].transpose(-1, -2) * scale).masked_fill(
        ~causal, float("-inf")), -1)
    ref = (probs * keep / (1 - dropout_p)) @ leaves[2]
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for hopper in (True, False):
        with tilesmith.backend.hopper_kernels(hopper):
            out, _ = torch.ops.tilesmith.attention_fwd_cuda(
                q, k, v, None, True, scale, dropout_p, torch.tensor([seed], device=dev))
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        check(f"attention dropout d=80 hopper={hopper}", out, ref)
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
            check(f"attention dropout d=80 hopper={hopper} {name}", got, want, bar=5e-2)

    check_varlen_attention(({}, {"tma": False}), split=True)

    # Decoding: one query over 1000 keys, split in 256-key ranges (the sm_80 forward and
    # attention_split_combine_kernel, on Hopper too).
    q = torch.randn(2, 4, 1, 128, device=dev, dtype=bf16)
    k, v = (torch.randn(2, 4, 1000, 128, device=dev, dtype=bf16) for _ in range(2))
    with tilesmith.ops.attention_split_keys(256):
        out = tilesmith.ops.scaled_dot_product_attention(q, k, v, backend="cuda")
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 128 ** -0.5, -1) @ v.double()
    check("attention decode split over keys", out, ref)

    # conv2d: 3x3 stride 2, 1x1, channels-last and NCHW, forward (fused) and backward; on
    # an H100 once on the wgmma kernels and once on the sm_80 ones (depthwise has its own).
    # c=k=264: wgmma's 256-wide tiles in the forward, dgrad and wgrad (the 1x1 ones: the
    # matmul kernels'); 2x2 stride 3: dgrad's phases reached by one tap and by none; an RGB
    # 7x7 first layer and a 12-channel depthwise conv, zero-filled to 8 and 16 channels; a
    # channel multiplier of 2 (run as the depthwise conv of x's channels repeated). Cases 1,
    # 2, 3, 6 and 8 add a residual before the ReLU (the 1x1 on the matmul kernels, groups,
    # the 256-wide tiles, depthwise, and zero-filled channels).
    cases = [((16, 24, 3, 2, 1, 1), True), ((72, 136, 1, 1, 0, 1), False),
             ((32, 48, 3, 1, 1, 2), True), ((264, 264, 3, 1, 1, 1), True),
             ((264, 264, 1, 1, 0, 1), True), ((16, 16, 2, 3, 1, 1), True),
             ((24, 24, 5, 2, 2, 24), False), ((3, 16, 7, 2, 3, 1), False),
             ((12, 12, 3, 1, 1, 12), True), ((8, 16, 3, 1, 1, 8), False)]
    for hopper in (True, False):
        for case, ((c, k, r, stride, pad, groups), channels_last) in enumerate(cases):
            x = torch.randn(2, c, 13, 11, device=dev, dtype=bf16)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            fan_in = c // groups * r * r
            w = (torch.randn(k, c // groups, r, r, device=dev, dtype=bf16) / fan_in ** 0.5)
            w.requires_grad_(True)
            bias = torch.randn(k, device=dev, dtype=bf16, requires_grad=True)
            inputs = [x, w, bias]
            if case in (1, 2, 3, 6, 8):
                shape = F.conv2d(x.detach(), w.detach(), None, stride, pad, groups=groups).shape
                inputs.append(torch.randn(shape, device=dev, dtype=bf16, requires_grad=True))
            with tilesmith.backend.hopper_kernels(hopper):
                out = tilesmith.ops.conv2d(*inputs[:3], stride, pad, groups=groups,
                                           activation="relu",
                                           residual=inputs[3] if len(inputs) > 3 else None,
                                           backend="cuda")
                grads = torch.autograd.grad(out.float().square().sum(), inputs)
            leaves = [t.detach().double().requires_grad_(True) for t in inputs]
            ref = F.conv2d(leaves[0], leaves[1], leaves[2], stride, pad, groups=groups)
            ref = F.relu(ref + leaves[3] if len(leaves) > 3 else ref)
            ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
            label = (f"conv2d hopper={hopper} {r}x{r} c={c} k={k}"
                     + (" residual" if len(inputs) > 3 else ""))
            check(label, out, ref)
            for name, got, want in zip(("dx", "dw", "dbias", "dresidual"), grads, ref_grads):
                check(f"{label} {name}", got, want, bar=5e-2)

    # FP8 scaled GEMM (sm_90a only): on the TMA and the cp.async kernels.
    if fp8_runs_here():
        quant = testing.quantize_fp8_reference
        a = torch.randn(130, 272, device=dev)
        w = torch.randn(200, 272, device=dev)
        check_scaled_gemm(({}, {"tma": False}))
        # quantize_fp8, bit-exact, on rows of 16-byte loads, an odd k (element loads), a
        # transposed view copied first and one read in place (16-byte aligned columns);
        # scaled_gemm on a k the op pads.
        x = torch.randn(67, 200, device=dev, dtype=torch.bfloat16)
        x_aligned = torch.randn(48, 272, device=dev, dtype=torch.bfloat16)
        for view in (x, x[:, :195], x.t(), x_aligned.t()):
            for granularity, block in (("tensor", 128), ("row", 128), ("block", 64),
                                       ("block", (32, 64))):
                q, s = tilesmith.ops.quantize_fp8(view, granularity=granularity,
                                                  block_size=block, backend="cuda")
                ref_q, ref_s = quant(view, torch.float8_e4m3fn,
                                     "block2d" if isinstance(block, tuple) else granularity,
                                     *(block if isinstance(block, tuple) else (1, block)))
                check_exact(f"quantize_fp8 {granularity} {tuple(view.shape)}",
                            torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
                            and torch.equal(s, ref_s))
        qa, sa = quant(a[:, :270], torch.float8_e4m3fn, "row")
        qw, sw = quant(w[:, :270], torch.float8_e4m3fn, "row")
        out = tilesmith.ops.scaled_gemm(qa, qw.t(), sa, sw.t(), out_dtype=torch.float32,
                                        backend="cuda")
        check("scaled_gemm row k=270 (padded)", out,
              testing.scaled_gemm_reference(qa, qw.t(), sa, sw.t()), bar=1e-5)
        # Float8Linear with per-block scaling, forward and backward: e4m3/e5m2 rounding
        # against float64 (the bars: ~26 dB for the output, ~21 dB for e5m2 gradients).
        layer = tilesmith.nn.Float8Linear(264, 200, dtype=bf16, device=dev, scaling="block")
        x = torch.randn(130, 264, device=dev, dtype=bf16, requires_grad=True)
        with tilesmith.use_backend("cuda"):
            out = layer(x)
            grads = torch.autograd.grad(out.float().square().sum(), (x, layer.weight))
        leaves = [t.detach().double().requires_grad_(True) for t in (x, layer.weight)]
        ref = leaves[0] @ leaves[1].t() + layer.bias.double()
        check("Float8Linear block", out, ref, bar=0.05)
        for name, got, want in zip(("dx", "dw"), grads,
                                   torch.autograd.grad(ref.square().sum(), leaves)):
            check(f"Float8Linear block {name}", got, want, bar=0.09)
    synchronize()
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all ok")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(probe_tma_kernels() if sys.argv[1:] == ["--tma-probe"] else main())

"""gemm: the fused GEMM + bias + activation against cuBLAS followed by the same epilogue as
eager ops, and against torch.compile of that expression, same run.

    python -m bench.gemm [--quick] [--out DIR]      # fused epilogues, then FP8

Shapes: squares 2048..8192 and LLM projections (M tokens = 16..16384; N, K in 4096..14336),
bf16 and fp16, bias + GELU (the MLP up-projection) and bias + residual (the down-projection).
Then the up-projection's training step (forward + backward) against eager autograd, and the
backward's fused elementwise pass (gelu' and the bias gradient) against aten's.
Then FP8 (run_fp8): scaled_gemm against torch._scaled_mm and bf16 cuBLAS (row-wise also
with the MLP's epilogue, bias + tanh GELU + residual, in the kernel against _scaled_mm with
its bias and the rest as eager ops), Float8Linear forward + backward (each backend of ours;
row-, tensor- and block-wise) against a bf16 Linear, and quantize_fp8 against the same
arithmetic in eager PyTorch.
"""

from __future__ import annotations


import torch

import tilesmith
from bench import harness
from tilesmith import testing
from tilesmith.ops.gemm import _torch_gemm, activation_backward, torch_activation

# The sweeps, full and quick. Quick: the target shape and one LLM up-projection, bias + GELU
# only (each torch.compile of the baseline expression costs seconds).
SQUARES = {"full": [2048, 4096, 8192], "quick": [8192]}
LLM = {"full": [(m, n, k) for m in (16, 512, 4096, 16384)
                for (n, k) in ((14336, 4096), (4096, 14336))],
       "quick": [(16384, 14336, 4096)]}
EPILOGUES = {"bias_gelu": {"activation": "gelu", "bias": True},
             "bias_residual": {"bias": True, "residual": True}}
ERROR_ROWS = 64


def run(quick: bool = False, backends=("triton", "cuda"), checkpoint=None):
    sweep = "quick" if quick else "full"
    shapes = [(n, n, n) for n in SQUARES[sweep]] + LLM[sweep]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    epilogues = {"bias_gelu": EPILOGUES["bias_gelu"]} if quick else EPILOGUES
    rows = []
    for (m, n, k) in shapes:
        for dtype in dtypes:
            for epilogue, spec in epilogues.items():
                a = torch.randn(m, k, device="cuda", dtype=dtype)
                b = torch.randn(k, n, device="cuda", dtype=dtype)
                kwargs = {"activation": spec.get("activation"),
                          "bias": torch.randn(n, device="cuda", dtype=dtype)
                          if spec.get("bias") else None,
                          "residual": torch.randn(m, n, device="cuda", dtype=dtype)
                          if spec.get("residual") else None}

                def eager():
                    return _torch_gemm(a, b, kwargs["bias"], kwargs["residual"],
                                       kwargs["activation"], 1.0, dtype)

                compiled = torch.compile(eager)
                ref = _torch_gemm(a[:ERROR_ROWS].double(), b.double(),
                                  None if kwargs["bias"] is None else kwargs["bias"].double(),
                                  None if kwargs["residual"] is None
                                  else kwargs["residual"][:ERROR_ROWS].double(),
                                  kwargs["activation"], 1.0, torch.float64)
                flops = 2 * m * n * k
                base_ms = harness.median_ms(eager)
                contenders = {"torch": eager, "torch_compile": compiled}
                for name in backends:
                    if tilesmith.backend.unavailable_reason(name, "gemm", a.device, dtype) is None:
                        contenders[name] = (lambda name=name: tilesmith.ops.gemm(
                            a, b, backend=name, **kwargs))
                shape = {"M": m, "N": n, "K": k, "epilogue": epilogue}
                for name, fn in contenders.items():
                    with harness.contender(rows, op="gemm", mode="fwd", backend=name,
                                           baseline="cublas+eager", dtype=str(dtype)[6:],
                                           shape=shape, baseline_ms=base_ms):
                        fn()
                        ms = base_ms if name == "torch" else harness.median_ms(fn)
                        rows.append(harness.Row(
                            op="gemm", mode="fwd", backend=name, baseline="cublas+eager",
                            dtype=str(dtype)[6:], shape=shape, ms=ms, tflops=flops / ms / 1e9,
                            baseline_ms=base_ms, ratio=base_ms / ms,
                            rel_err=testing.rel_error(fn()[:ERROR_ROWS], ref),
                            peak_mem_bytes=harness.peak_memory(fn), joules=None))
                print(f"gemm {str(dtype)[6:]} {m}x{n}x{k} {epilogue}: " + ", ".join(
                    harness.brief(r, "{backend} {tflops:.0f} TF/s ({ratio:.2f}x)") for r in rows
                    if r.shape == shape and r.dtype == str(dtype)[6:]), flush=True)
                if checkpoint:
                    checkpoint(rows)
    for (m, n, k) in TRAINING_SHAPES[sweep]:
        rows += _training_rows(m, n, k, torch.bfloat16, backends)
        if checkpoint:
            checkpoint(rows)
    return rows


TRAINING_SHAPES = {"full": [(8192, 8192, 8192), (16384, 14336, 4096)],
                   "quick": [(8192, 8192, 8192)]}


def _training_rows(m, n, k, dtype, backends):
    """The MLP up-projection's training step (gemm + bias + GELU, forward and backward)
    against eager autograd (cuBLAS, then PyTorch's own GELU and bias backward), and the
    backward's elementwise pass alone (dz = grad * gelu'(pre) and the bias gradient) against
    aten's gelu_backward + sum, in GB/s of grad and pre read and dz written."""
    a = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(k, n, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(m, n, device="cuda", dtype=dtype)
    ours = [name for name in backends
            if tilesmith.backend.unavailable_reason(name, "gemm", a.device, dtype) is None]

    def step(forward):
        return lambda: torch.autograd.grad(forward(), (a, b, bias), grad)

    contenders = {"torch": step(lambda: _torch_gemm(a, b, bias, None, "gelu", 1.0, dtype))}
    for name in ours:
        contenders[name] = step(lambda name=name: tilesmith.ops.gemm(
            a, b, bias=bias, activation="gelu", backend=name))
    base_ms = harness.median_ms(contenders["torch"])
    shape = {"M": m, "N": n, "K": k, "epilogue": "bias_gelu"}
    rows = []
    for name, fn in contenders.items():
        with harness.contender(rows, op="gemm", mode="fwd+bwd", backend=name,
                               baseline="cublas+eager", dtype=str(dtype)[6:], shape=shape,
                               baseline_ms=base_ms):
            ms = base_ms if name == "torch" else harness.median_ms(fn)
            rows.append(harness.Row(op="gemm", mode="fwd+bwd", backend=name,
                                    baseline="cublas+eager", dtype=str(dtype)[6:], shape=shape,
                                    ms=ms, tflops=3 * 2 * m * n * k / ms / 1e9,
                                    baseline_ms=base_ms, ratio=base_ms / ms, rel_err=None))

    pre = torch.randn(m, n, device="cuda", dtype=dtype)

    def eager():
        dz = torch.ops.aten.gelu_backward(grad, pre)
        return dz, dz.sum(0, dtype=torch.float32)

    eager_ms = harness.median_ms(eager)
    moved = 3 * pre.numel() * pre.element_size()
    for name in ours:
        with harness.contender(rows, op="activation_backward", mode="bwd", backend=name,
                               baseline="torch_eager", dtype=str(dtype)[6:],
                               shape={"M": m, "N": n, "activation": "gelu"},
                               baseline_ms=eager_ms):
            ms = harness.median_ms(lambda name=name: activation_backward(
                grad, pre, "gelu", True, cuda=name == "cuda"))
            rows.append(harness.Row(op="activation_backward", mode="bwd", backend=name,
                                    baseline="torch_eager", dtype=str(dtype)[6:],
                                    shape={"M": m, "N": n, "activation": "gelu"}, ms=ms,
                                    tflops=None, baseline_ms=eager_ms, ratio=eager_ms / ms,
                                    rel_err=None, note=f"{moved / ms / 1e6:.0f} GB/s (eager "
                                                       f"{moved / eager_ms / 1e6:.0f})"))
    print(f"gemm training step {m}x{n}x{k} bias_gelu: " + ", ".join(
        harness.brief(r, "{op}/{backend} {ratio:.2f}x") for r in rows), flush=True)
    return rows


FP8_SHAPES = {"full": [(8192, 8192, 4096)] + [(m, n, k) for m in (16, 1024, 16384)
                                              for (n, k) in ((14336, 4096), (4096, 14336))],
              "quick": [(8192, 8192, 4096), (16, 14336, 4096)]}
FLOAT8_LINEAR_SIZE = {"full": 8192, "quick": 4096}  # M = N = K of its training step


def _scaled_mm(qa, qb, sa, sb):
    return torch._scaled_mm(qa, qb, sa, sb, out_dtype=torch.bfloat16)


def _fp8_epilogue_rows(qa, qb, sa, sb, product, shape, flops, backends):
    """Row-wise scaled_gemm with an MLP's epilogue, gelu_tanh(a b + bias) + residual, in
    one kernel, against torch._scaled_mm (which adds the bias itself) and the GELU and the
    add as eager ops. rel_err as the other fp8 rows': against the epilogue of ``product``,
    the unquantized operands' float64 product (its first ERROR_ROWS rows)."""
    bias = torch.randn(shape["N"], device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(shape["M"], shape["N"], device="cuda", dtype=torch.bfloat16)

    def eager():
        y = torch._scaled_mm(qa, qb, sa, sb, bias=bias, out_dtype=torch.bfloat16)
        return torch_activation(y, "gelu_tanh") + residual

    try:
        base_ms = harness.median_ms(eager)
    except RuntimeError as exc:
        print(f"  torch._scaled_mm with a bias: {str(exc).splitlines()[0][:100]}")
        return []
    ref = torch_activation(product + bias.double(), "gelu_tanh") + residual[:ERROR_ROWS].double()
    rows = []
    common = dict(op="fp8_gemm", mode="fwd_epilogue", baseline="scaled_mm_row+eager",
                  dtype="e4m3_row", shape=shape, baseline_ms=base_ms)
    for label, backend, switches in harness.contenders("fp8", backends, qa.device,
                                                       torch.float8_e4m3fn):
        def fn(be=backend):
            return tilesmith.ops.scaled_gemm(qa, qb, sa, sb, bias=bias, activation="gelu_tanh",
                                             residual=residual, backend=be)

        with (harness.contender(rows, backend=label, **common),
              tilesmith.backend.hopper_kernels(**switches)):
            fn()
            ms = harness.median_ms(fn)
            rows.append(harness.Row(backend=label, ms=ms, tflops=flops / ms / 1e9,
                                    ratio=base_ms / ms,
                                    rel_err=testing.rel_error(fn()[:ERROR_ROWS], ref),
                                    peak_mem_bytes=None, joules=None, **common))
    return rows


def run_fp8(quick: bool = False, backends=("triton", "cuda"), checkpoint=None):
    """scaled_gemm (tensor-wise, row-wise, 1x128/128x128 blocks) against torch._scaled_mm
    (tensor-wise and row-wise) and against bf16 cuBLAS on the same shapes; then Float8Linear
    forward+backward against a bf16 Linear."""
    rows = []
    sweep = "quick" if quick else "full"
    e4m3 = torch.float8_e4m3fn
    for (m, n, k) in FP8_SHAPES[sweep]:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        flops = 2 * m * n * k
        bf16_ms = harness.median_ms(lambda: torch.matmul(a, w.t()))
        ref = torch.matmul(a[:ERROR_ROWS].double(), w.double().t())
        shape = {"M": m, "N": n, "K": k}
        rows.append(harness.Row(op="fp8_gemm", mode="fwd", backend="torch_bf16",
                                baseline="cublas_bf16", dtype="bfloat16", shape=shape,
                                ms=bf16_ms, tflops=flops / bf16_ms / 1e9, baseline_ms=bf16_ms,
                                ratio=1.0, rel_err=None, peak_mem_bytes=None, joules=None))
        for granularity in ("tensor", "row", "block"):
            # The operands quantized by plain PyTorch (bit-exact with quantize_fp8, tested),
            # so that a fault in our quantize kernels cannot cost the GEMM rows.
            quantize = testing.quantize_fp8_reference
            if granularity == "block":
                qa, sa = quantize(a, e4m3, "block", block_k=128)
                qw, sw = quantize(w, e4m3, "block2d", block_m=128, block_k=128)
            else:
                qa, sa = quantize(a, e4m3, granularity)
                qw, sw = quantize(w, e4m3, granularity)
            sb = sw.t() if sw.dim() == 2 else sw
            base_name, base_ms = None, None
            if granularity != "block":
                try:
                    base_ms = harness.median_ms(lambda: _scaled_mm(qa, qw.t(), sa, sb))
                    base_name = f"scaled_mm_{granularity}"
                    rows.append(harness.Row(
                        op="fp8_gemm", mode="fwd", backend="torch_scaled_mm",
                        baseline=base_name, dtype=f"e4m3_{granularity}", shape=shape,
                        ms=base_ms, tflops=flops / base_ms / 1e9, baseline_ms=base_ms,
                        ratio=1.0, rel_err=testing.rel_error(
                            _scaled_mm(qa, qw.t(), sa, sb)[:ERROR_ROWS], ref),
                        peak_mem_bytes=None, joules=None, extra={"vs_bf16": bf16_ms / base_ms}))
                except RuntimeError as exc:
                    print(f"  torch._scaled_mm {granularity}: {str(exc).splitlines()[0][:100]}")
            for label, backend, switches in harness.contenders("fp8", backends, a.device,
                                                               e4m3):
                def fn(be=backend):
                    return tilesmith.ops.scaled_gemm(qa, qw.t(), sa, sb, backend=be)

                with (harness.contender(rows, op="fp8_gemm", mode="fwd", backend=label,
                                        baseline=base_name or "cublas_bf16",
                                        dtype=f"e4m3_{granularity}", shape=shape,
                                        baseline_ms=base_ms or bf16_ms),
                      tilesmith.backend.hopper_kernels(**switches)):  # set outside the timing
                    fn()
                    ms = harness.median_ms(fn)
                    rows.append(harness.Row(
                        op="fp8_gemm", mode="fwd", backend=label,
                        baseline=base_name or "cublas_bf16", dtype=f"e4m3_{granularity}",
                        shape=shape, ms=ms, tflops=flops / ms / 1e9,
                        baseline_ms=base_ms or bf16_ms, ratio=(base_ms or bf16_ms) / ms,
                        rel_err=testing.rel_error(fn()[:ERROR_ROWS], ref), peak_mem_bytes=None,
                        joules=None, extra={"vs_bf16": bf16_ms / ms}))
            if granularity == "row":
                rows += _fp8_epilogue_rows(qa, qw.t(), sa, sb, ref, shape, flops, backends)
        print(f"fp8 {m}x{n}x{k}: " + ", ".join(
            harness.brief(r, "{backend}/{dtype} {tflops:.0f} TF/s") for r in rows
            if r.shape == shape),
            flush=True)
        if checkpoint:
            checkpoint(rows)

    # Float8Linear forward + backward against bf16 Linear.
    size = FLOAT8_LINEAR_SIZE[sweep]
    x = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    linear = torch.nn.Linear(size, size, device="cuda", dtype=torch.bfloat16)
    fp8_linears = {scaling: tilesmith.nn.Float8Linear.from_linear(linear, scaling=scaling)
                   for scaling in ("row", "tensor", "block")}
    grad = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)

    def step(module):
        return lambda: torch.autograd.grad(module(x), (x, module.weight, module.bias), grad)

    def on_backend(fn, name):
        def run_on():
            with tilesmith.use_backend(name):
                return fn()
        return run_on

    base_ms = harness.median_ms(step(linear))
    flops = 3 * 2 * size ** 3
    candidates = [("torch_bf16", step(linear))] + [
        (f"float8_linear_{name}_{scaling}", on_backend(step(module), name))
        for name in backends for scaling, module in fp8_linears.items()
        if not tilesmith.backend.unavailable_reason(name, "fp8", x.device, torch.bfloat16)]
    shape = {"M": size, "N": size, "K": size}
    for name, fn in candidates:
        with harness.contender(rows, op="float8_linear", mode="fwd+bwd", backend=name,
                               baseline="linear_bf16", dtype="bfloat16", shape=shape,
                               baseline_ms=base_ms):
            ms = base_ms if name == "torch_bf16" else harness.median_ms(fn)
            rows.append(harness.Row(op="float8_linear", mode="fwd+bwd", backend=name,
                                    baseline="linear_bf16", dtype="bfloat16", shape=shape,
                                    ms=ms, tflops=flops / ms / 1e9, baseline_ms=base_ms,
                                    ratio=base_ms / ms, rel_err=None, peak_mem_bytes=None,
                                    joules=None))

    # quantize_fp8 (memory-bound: GB/s of x read once and q written) against the same
    # arithmetic in eager PyTorch (what a model without a fused kernel runs).
    fmax = torch.finfo(e4m3).max
    for granularity in ("tensor", "row"):

        def eager(g=granularity):
            xd = x.detach()
            amax = xd.abs().amax(1, keepdim=True) if g == "row" else xd.abs().amax()
            inverse = fmax / amax.float().clamp_min(1e-12)
            return (xd.float() * inverse).clamp(-fmax, fmax).to(e4m3), 1 / inverse

        eager_ms = harness.median_ms(eager)
        moved = x.numel() * (x.element_size() + 1)
        for name in backends:
            if tilesmith.backend.unavailable_reason(name, "fp8", x.device, torch.bfloat16):
                continue

            def fn(be=name, g=granularity):
                return tilesmith.ops.quantize_fp8(x.detach(), granularity=g, backend=be)

            with harness.contender(rows, op="quantize_fp8", mode="fwd", backend=name,
                                   baseline="torch_eager", dtype=f"bf16->e4m3_{granularity}",
                                   shape={"M": size, "K": size}, baseline_ms=eager_ms):
                ms = harness.median_ms(fn)
                rows.append(harness.Row(
                    op="quantize_fp8", mode="fwd", backend=name, baseline="torch_eager",
                    dtype=f"bf16->e4m3_{granularity}", shape={"M": size, "K": size}, ms=ms,
                    tflops=None, baseline_ms=eager_ms, ratio=eager_ms / ms, rel_err=None,
                    note=f"{moved / ms / 1e6:.0f} GB/s (eager {moved / eager_ms / 1e6:.0f})"))
    if checkpoint:
        checkpoint(rows)
    return rows


def main():
    harness.script_main(__doc__, "gemm", run, run_fp8)


if __name__ == "__main__":
    main()

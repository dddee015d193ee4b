"""matmul: tilesmith's cuda and triton backends against torch.matmul (cuBLAS), same run.

    python -m bench.matmul [--quick] [--out DIR]

Shapes: squares 512..8192 and LLM projections (M = 16..8192 tokens; N, K in 4096..14336),
fp16, bf16, and fp32 on the squares (with TF32 allowed for every contender alike, the way
training code runs it; the IEEE path is in the tests, not in the timings).
"""

from __future__ import annotations


import torch

import tilesmith
from bench import harness
from tilesmith import testing

SQUARES = [512, 1024, 2048, 4096, 8192]
LLM = [(m, n, k) for m in (16, 128, 1024, 8192)
       for (n, k) in ((4096, 4096), (14336, 4096), (4096, 14336))]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ERROR_ROWS = 64  # rows of the float64 reference computed per shape (a cheap, honest sample)


def shapes(quick: bool):
    squares = [(n, n, n) for n in ([1024, 4096, 8192] if quick else SQUARES)]
    llm = [(16, 4096, 4096), (8192, 14336, 4096)] if quick else LLM
    return [("square", s) for s in squares] + [("llm", s) for s in llm]


def bench_shape(m, n, k, dtype, backends, meter, peak_tflops, kind):
    # Energy takes a >= 1 s loop per row: measured on the headline shapes only.
    if not (kind == "square" and m >= 4096):
        meter = None
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(k, n, device="cuda", dtype=dtype)
    flops = 2 * m * n * k
    ref = torch.matmul(a[:ERROR_ROWS].double(), b.double())
    base_fn = lambda: torch.matmul(a, b)  # noqa: E731
    base_ms = harness.median_ms(base_fn)
    base_err = testing.rel_error(base_fn()[:ERROR_ROWS], ref)
    shape = {"M": m, "N": n, "K": k}
    rows = [harness.Row(
        op="matmul", mode="fwd", backend="torch", baseline="cublas", dtype=str(dtype)[6:],
        shape=shape, ms=base_ms, tflops=flops / base_ms / 1e9, baseline_ms=base_ms, ratio=1.0,
        rel_err=base_err, baseline_rel_err=base_err,
        pct_of_peak=100 * flops / base_ms / 1e9 / peak_tflops,
        peak_mem_bytes=harness.peak_memory(base_fn),
        joules=harness.joules_per_call(base_fn, meter) if meter else None, extra={"kind": kind})]
    for label, name, switches in harness.contenders("matmul", backends, a.device, dtype):
        fn = lambda name=name: tilesmith.ops.matmul(a, b, backend=name)  # noqa: E731
        with (harness.contender(rows, op="matmul", mode="fwd", backend=label,
                                baseline="cublas", dtype=str(dtype)[6:], shape=shape,
                                baseline_ms=base_ms, extra={"kind": kind}),
              tilesmith.backend.hopper_kernels(**switches)):  # set outside the timing
            fn()  # autotune / first launch outside the timing
            ms = harness.median_ms(fn)
            rows.append(harness.Row(
                op="matmul", mode="fwd", backend=label, baseline="cublas",
                dtype=str(dtype)[6:], shape=shape, ms=ms, tflops=flops / ms / 1e9,
                baseline_ms=base_ms, ratio=base_ms / ms,
                rel_err=testing.rel_error(fn()[:ERROR_ROWS], ref), baseline_rel_err=base_err,
                pct_of_peak=100 * flops / ms / 1e9 / peak_tflops,
                peak_mem_bytes=harness.peak_memory(fn),
                joules=harness.joules_per_call(fn, meter) if meter else None,
                extra={"kind": kind}))
    return rows


def run(quick: bool = False, backends=("cuda", "triton"), checkpoint=None
        ) -> tuple[list, dict]:
    """All rows, and the measured peaks. ``checkpoint(rows, peaks)`` is called after each
    shape, so a run cut short by a time limit still leaves what it measured."""
    torch.set_float32_matmul_precision("high")  # TF32 for fp32, for cuBLAS and ours alike
    meter = harness.EnergyMeter()
    peaks = {str(dt)[6:]: harness.measured_peak_tflops(dt) for dt in DTYPES}
    rows = []
    for kind, (m, n, k) in shapes(quick):
        for dtype in DTYPES:
            if dtype == torch.float32 and kind == "llm":
                continue  # TF32 on the squares only: the LLM shapes run in bf16/fp16
            rows += bench_shape(m, n, k, dtype, backends, meter, peaks[str(dtype)[6:]], kind)
            last = rows[-1]
            print(f"matmul {str(dtype)[6:]:8s} {m}x{n}x{k}: " + ", ".join(
                harness.brief(r, "{backend} {tflops:.0f} TF/s ({ratio:.2f}x)") for r in rows
                if r.shape == last.shape and r.dtype == last.dtype), flush=True)
            if checkpoint:
                checkpoint(rows, peaks)
    return rows, peaks


def main():
    harness.script_main(__doc__, "matmul", run, plot_title="matmul vs cuBLAS (same run)")


if __name__ == "__main__":
    main()

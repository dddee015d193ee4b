"""gemm: the fused GEMM + bias + activation against cuBLAS followed by the same epilogue as
eager ops, and against torch.compile of that expression, same run.

    python -m bench.gemm [--quick] [--out DIR]

Shapes: squares 2048..8192 and LLM projections (M tokens = 16..16384; N, K in 4096..14336),
bf16 and fp16, bias + GELU (the MLP up-projection) and bias + residual (the down-projection).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tilesmith
from bench import harness
from tilesmith import testing
from tilesmith.ops.gemm import _torch_gemm

SQUARES = [2048, 4096, 8192]
LLM = [(m, n, k) for m in (16, 512, 4096, 16384) for (n, k) in ((14336, 4096), (4096, 14336))]
EPILOGUES = {"bias_gelu": {"activation": "gelu", "bias": True},
             "bias_residual": {"bias": True, "residual": True}}
ERROR_ROWS = 64


def run(quick: bool = False, backends=("triton", "cuda"), checkpoint=None):
    # quick: the target shape and one LLM up-projection, bias + GELU only (each torch.compile
    # of the baseline expression costs seconds).
    shapes = [(n, n, n) for n in ([8192] if quick else SQUARES)] + (
        [(16384, 14336, 4096)] if quick else LLM)
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
                    fn()
                    ms = base_ms if name == "torch" else harness.median_ms(fn)
                    rows.append(harness.Row(
                        op="gemm", mode="fwd", backend=name, baseline="cublas+eager",
                        dtype=str(dtype)[6:], shape=shape, ms=ms, tflops=flops / ms / 1e9,
                        baseline_ms=base_ms, ratio=base_ms / ms,
                        rel_err=testing.rel_error(fn()[:ERROR_ROWS], ref),
                        peak_mem_bytes=harness.peak_memory(fn), joules=None))
                print(f"gemm {str(dtype)[6:]} {m}x{n}x{k} {epilogue}: " + ", ".join(
                    f"{r.backend} {r.tflops:.0f} TF/s ({r.ratio:.2f}x)" for r in rows
                    if r.shape == shape and r.dtype == str(dtype)[6:]), flush=True)
                if checkpoint:
                    checkpoint(rows)
                del a, b, kwargs
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    rows = run(args.quick)
    harness.write_results(rows, harness.environment(), args.out, {})
    (args.out / "gemm.md").write_text(harness.markdown_table(rows))
    print(harness.markdown_table(rows))


if __name__ == "__main__":
    main()

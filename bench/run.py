"""``make bench``: every op against the vendor library on this GPU, or, without a GPU, a
correctness sweep of the Triton kernels through the interpreter (timings need a GPU).

    python -m bench.run [--quick] [--out DIR] [--pytest-log FILE] [--build-log FILE]

Writes DIR/results.json, DIR/report.md and DIR/<op>.png.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

# The targets of the open issues (ratio to the vendor library, same run, H100).
TARGETS = [
    # op, backend, dtype, shape, minimum ratio
    ("matmul", "cuda", "bfloat16", {"M": 4096, "N": 4096, "K": 4096}, 0.85),
    ("matmul", "cuda", "bfloat16", {"M": 8192, "N": 8192, "K": 8192}, 0.85),
    ("matmul", "triton", "bfloat16", {"M": 4096, "N": 4096, "K": 4096}, 0.90),
    ("matmul", "triton", "bfloat16", {"M": 8192, "N": 8192, "K": 8192}, 0.90),
]


def gpu_main(args) -> int:
    from bench import harness
    from bench import matmul as matmul_bench

    env = harness.environment()

    def write(rows, peaks):
        harness.write_results(rows, env, args.out, peaks)
        (args.out / "report.md").write_text(render_report(rows, peaks, env, args))

    rows, peaks = matmul_bench.run(quick=args.quick, checkpoint=write)
    write(rows, peaks)
    harness.plot_ratios([r for r in rows if r.backend != "torch"], args.out / "matmul.png",
                        f"matmul vs cuBLAS, {env['gpu']} (same run)")
    print((args.out / "report.md").read_text())
    return 0


def render_report(rows, peaks, env, args) -> str:
    from bench import harness

    report = ["# tilesmith GPU report\n\n",
              "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in env.items()),
              "\nMeasured peaks (cuBLAS 8192³ in this run, TFLOP/s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + "\n"]
    for log, title in ((args.build_log, "Build"), (args.pytest_log, "Tests")):
        if log and Path(log).exists():
            text = Path(log).read_text(errors="replace").splitlines()
            summary = [line for line in text if re.search(
                r"(passed|failed|error|rc=)", line)][-3:]
            report.append(f"\n## {title}\n\n```\n" + "\n".join(summary) + "\n```\n")
    report.append("\n## Targets\n\n| op | backend | dtype | shape | target | measured |\n"
                  "|---|---|---|---|---|---|\n")
    for op, backend, dtype, shape, minimum in TARGETS:
        found = [r for r in rows
                 if (r.op, r.backend, r.dtype, r.shape) == (op, backend, dtype, shape)]
        got = f"{found[0].ratio:.3f}" if found else "not run"
        verdict = "" if not found else (" ✅" if found[0].ratio >= minimum else " ❌")
        report.append(f"| {op} | {backend} | {dtype} | {'×'.join(map(str, shape.values()))} "
                      f"| ≥ {minimum} | {got}{verdict} |\n")
    report.append("\n## matmul\n\n" + harness.markdown_table(rows))
    return "".join(report)


def interpreter_main(args) -> int:
    """Without a GPU: the Triton kernels through the interpreter on every sample, errors
    against float64 next to PyTorch's own."""
    from tilesmith import testing

    import tilesmith

    print("No CUDA GPU here: running the correctness sweep of the Triton kernels through the "
          "interpreter (TRITON_INTERPRET=1). Timings need a GPU: run `make bench` there.\n")
    print(f"{'sample':24s} {'dtype':9s} {'triton rel err':>15s} {'torch rel err':>14s}  verdict")
    failures = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for sample in testing.matmul_sample_inputs("cpu", dtype):
            a, b = sample.args
            ref = torch.matmul(a.double(), b.double())
            with testing.poison_outputs():
                out = tilesmith.ops.matmul(a, b, backend="triton")
            err = testing.rel_error(out, ref)
            base = testing.rel_error(torch.matmul(a, b), ref)
            limit = (max(2 * base, testing.ulp(dtype)) if dtype != torch.float32
                     else testing.FP32_IEEE_RTOL)
            ok = err <= limit
            failures += not ok
            print(f"{sample.name:24s} {str(dtype)[6:]:9s} {err:15.3e} {base:14.3e}  "
                  f"{'ok' if ok else 'FAIL'}")
    print(f"\n{failures} failure(s). Timings need a GPU.")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--pytest-log")
    parser.add_argument("--build-log")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        return gpu_main(args)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # Must be set before triton is imported; re-run ourselves with it.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "bench.run", *sys.argv[1:]])
    return interpreter_main(args)


if __name__ == "__main__":
    sys.exit(main())

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
import time
from pathlib import Path

import torch

# The targets of the open issues (ratio to the vendor library, same run, H100).
TARGETS = [
    # op, backend, dtype, shape, minimum ratio, mode
    ("matmul", "cuda", "bfloat16", {"M": 4096, "N": 4096, "K": 4096}, 0.85, "fwd"),
    ("matmul", "cuda", "bfloat16", {"M": 8192, "N": 8192, "K": 8192}, 0.85, "fwd"),
    ("matmul", "triton", "bfloat16", {"M": 4096, "N": 4096, "K": 4096}, 0.90, "fwd"),
    ("matmul", "triton", "bfloat16", {"M": 8192, "N": 8192, "K": 8192}, 0.90, "fwd"),
] + [
    # GEMM + bias + GELU 8192^3 bf16 >= 1.10x cuBLAS + eager epilogue (both backends)
    ("gemm", backend, "bfloat16", {"M": 8192, "N": 8192, "K": 8192, "epilogue": "bias_gelu"},
     1.10, "fwd") for backend in ("triton", "cuda")
] + [
    # FP8 row-wise 8192x8192x4096: >= 0.90x torch._scaled_mm; Float8Linear >= 1.3x bf16 Linear
    ("fp8_gemm", "triton", "e4m3_row", {"M": 8192, "N": 8192, "K": 4096}, 0.90, "fwd"),
    ("fp8_gemm", "cuda", "e4m3_row", {"M": 8192, "N": 8192, "K": 4096}, 0.90, "fwd"),
    ("float8_linear", "float8_linear", "bfloat16", {"M": 8192, "N": 8192, "K": 8192}, 1.30,
     "fwd+bwd"),
] + [
    # conv2d, bf16 channels_last, ResNet-50 batch 32, vs cuDNN: Triton forward >= 0.70x;
    # CUDA forward >= 0.80x (3x3) / 0.90x (1x1), fused conv+bias+ReLU >= 1.0x cuDNN + eager
    # ReLU, dgrad and wgrad >= 0.60x
    ("conv2d", backend, "bfloat16", {"layer": name, "N": 32, "C": c, "K": k, "H": h, "R": r,
                                     "stride": st}, minimum, mode)
    for name, c, k, h, r, st in (("l1_3x3_64", 64, 64, 56, 3, 1),
                                 ("l3_1x1_1024_256", 1024, 256, 14, 1, 1))
    for backend, mode, minimum in (("triton", "fwd", 0.70),
                                   ("cuda", "fwd", 0.80 if r == 3 else 0.90),
                                   ("cuda", "fused", 1.0), ("cuda", "dgrad", 0.60),
                                   ("cuda", "wgrad", 0.60))
] + [
    # training steps of the examples (bf16 autocast): >= 1.0x native eager
    ("train_cifar_resnet", "tilesmith", "bfloat16", {"steps": 40}, 1.0, "fwd+bwd"),
    ("train_gpt_char", "tilesmith", "bfloat16", {"steps": 40}, 1.0, "fwd+bwd"),
] + [
    # attention, bf16, d=128, 16k tokens, vs SDPA-cuDNN: Triton forward >= 0.80x, backward
    # >= 0.60x; CUDA (sm_80-style mma.sync) forward and backward >= 0.70x
    ("attention", backend, "bfloat16", {"B": 16384 // s, "H": 16, "S": s, "D": 128,
                                        "causal": causal}, minimum, mode)
    for s in (1024, 4096, 16384) for causal in (False, True)
    for backend, mode, minimum in (("triton", "fwd", 0.80), ("triton", "bwd", 0.60),
                                   ("cuda", "fwd", 0.70), ("cuda", "bwd", 0.70))
]


FAMILIES = ("matmul", "attention", "gemm", "fp8", "conv2d", "examples")  # in this order


def gpu_main(args) -> int:
    families = args.ops.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--ops: unknown op families {unknown}; known: {', '.join(FAMILIES)}")
    if len(families) == 1:
        return run_family(args, families[0])
    return run_families(args, families)


def run_family(args, family: str) -> int:
    """One op family's sweep in this process: args.out gets its results.json, report.md and
    plot, rewritten after each shape so that a run cut short still leaves what it measured."""
    from bench import attention as attention_bench
    from bench import conv2d as conv2d_bench
    from bench import examples as examples_bench
    from bench import gemm as gemm_bench
    from bench import harness
    from bench import matmul as matmul_bench

    env = harness.environment()
    peaks: dict = {}

    def write(rows, current_peaks=None):
        peaks.update(current_peaks or {})
        harness.write_results(rows, env, args.out, peaks)
        harness.write_text_atomically(args.out / "report.md",
                                      render_report(rows, peaks, env, args))

    if family == "matmul":
        rows, _ = matmul_bench.run(quick=args.quick, checkpoint=write)
        harness.plot_ratios([r for r in rows if r.backend != "torch"],
                            args.out / "matmul.png", f"matmul vs cuBLAS, {env['gpu']} (same run)")
    elif family == "attention":
        rows = attention_bench.run(quick=args.quick, checkpoint=write)
        harness.plot_ratios([r for r in rows if r.ratio is not None
                             and r.baseline == "sdpa_cudnn" and r.backend != "sdpa_cudnn"],
                            args.out / "attention.png",
                            f"attention vs SDPA cuDNN, {env['gpu']} (same run)")
    elif family == "gemm":
        rows = gemm_bench.run(quick=args.quick, checkpoint=write)
    elif family == "fp8":
        rows = gemm_bench.run_fp8(quick=args.quick, checkpoint=write)
    elif family == "conv2d":
        rows = conv2d_bench.run(quick=args.quick, checkpoint=write)
    else:
        rows = examples_bench.run(quick=args.quick, checkpoint=write, out_dir=args.out)
    write(rows)
    print((args.out / "report.md").read_text())
    return 0


def _family_command(family: str, out: Path, quick: bool) -> list[str]:
    return ([sys.executable, "-m", "bench.run", "--ops", family, "--out", str(out)]
            + (["--quick"] if quick else []))


def run_families(args, families, family_command=_family_command) -> int:
    """Each op family in a process of its own (``python -m bench.run --ops FAMILY``), one
    after another: a kernel fault that loses a process's CUDA context, a crash or a hang then
    costs the rest of that family's rows, not the other families'. A family that prints
    nothing for args.silence_limit seconds (each contender says when it starts) is stopped.
    Their rows are merged into args.out (results.json, report.md, the plots), rewritten
    after each family; an interrupt (make gpu-report's time limit) stops the family running
    and starts no other."""
    import shutil
    import tempfile

    from bench import harness

    work = Path(tempfile.mkdtemp(prefix="tilesmith-bench-"))
    rows, peaks, env, processes = [], {}, None, {}
    try:
        for index, family in enumerate(families):
            out = work / family
            start = time.monotonic()
            try:
                how, rc = _run_watched(family_command(family, out, args.quick),
                                       args.silence_limit)
            except KeyboardInterrupt:
                how, rc = "interrupted", None
            seconds = time.monotonic() - start
            try:
                family_rows, family_peaks, family_env = harness.read_results(
                    out / "results.json")
                rows += family_rows
                peaks.update(family_peaks)
                env = env or family_env
                kept = f"{len(family_rows)} rows"
            except FileNotFoundError:
                kept = "no rows"
            except (ValueError, KeyError, TypeError) as exc:
                kept = f"no rows (its results.json is unreadable: {exc})"
            for path in out.glob("*"):  # plots, the examples' curves
                if path.is_file() and path.name not in ("results.json", "report.md"):
                    shutil.move(path, args.out / path.name)
            processes[family] = {
                "exited": f"exited with rc {rc} after {seconds:.0f} s, {kept}" if rc
                          else f"ok in {seconds:.0f} s, {kept}",
                "silent": f"printed nothing for {args.silence_limit:.0f} s: stopped after "
                          f"{seconds:.0f} s, {kept}",
                "interrupted": f"stopped by the time limit after {seconds:.0f} s, {kept}",
            }[how]
            if how == "interrupted":
                processes.update({later: "not run: the time limit came first"
                                  for later in families[index + 1:]})
            harness.write_results(rows, env or {}, args.out, peaks, processes=processes)
            harness.write_text_atomically(
                args.out / "report.md", render_report(rows, peaks, env or {}, args, processes))
            if how == "interrupted":
                return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "report.md").read_text())
    return 0 if all(how.startswith("ok") for how in processes.values()) else 1


def _run_watched(command, silence_limit: float) -> tuple[str, int | None]:
    """Runs ``command``, echoing its output, until it exits: ("exited", its return code),
    or ("silent", None) when it printed nothing for ``silence_limit`` seconds (then it gets
    SIGINT, and SIGKILL 10 s later). On KeyboardInterrupt, which the child received too
    (same process group), waits 10 s for it to write what it measured, then kills it."""
    import signal
    import subprocess
    import threading

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                               cwd=Path(__file__).resolve().parent.parent)  # where bench/ is
    last_output = [time.monotonic()]

    def echo():
        for line in process.stdout:
            last_output[0] = time.monotonic()
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()

    def stop():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)

    try:
        while process.poll() is None:
            if time.monotonic() - last_output[0] > silence_limit:
                process.send_signal(signal.SIGINT)
                stop()
                return "silent", None
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop()
        raise
    reader.join(timeout=5)
    return "exited", process.returncode


def render_report(rows, peaks, env, args, processes=None) -> str:
    """report.md: the environment, the build and test summaries, how each op family's
    process ended (``processes``, from run_families), the targets, what failed, and a table
    of every row per op."""
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
    if processes:
        report.append("\n## Benchmark processes\n\n| op family | how it ended |\n|---|---|\n"
                      + "".join(f"| {family} | {how} |\n" for family, how in processes.items()))
    report.append("\n## Targets\n\n| op | backend | dtype | shape | target | measured |\n"
                  "|---|---|---|---|---|---|\n")
    for op, backend, dtype, shape, minimum, mode in TARGETS:
        found = [r for r in rows if (r.op, r.backend, r.dtype, r.shape, r.mode)
                 == (op, backend, dtype, shape, mode)]
        timed = [r for r in found if r.ratio is not None]
        if timed:
            got = f"{timed[0].ratio:.3f}" + (" ✅" if timed[0].ratio >= minimum else " ❌")
        else:
            got = "FAILED ❌" if any(r.ms is None for r in found) else "not run"
        report.append(f"| {op} {mode} | {backend} | {dtype} | "
                      f"{harness.shape_text(shape)} | ≥ {minimum} | {got} |\n")
    failed = [r for r in rows if r.ms is None]
    if failed:
        report.append(f"\n## Failures ({len(failed)})\n\n| op | mode | backend | dtype | shape "
                      "| error |\n|---|---|---|---|---|---|\n" + "".join(
                          f"| {r.op} | {r.mode} | {r.backend} | {r.dtype} | "
                          f"{harness.shape_text(r.shape)} | {r.note.replace('|', '/')} |\n"
                          for r in failed))
    for op in dict.fromkeys(r.op for r in rows):
        report.append(f"\n## {op}\n\n" + harness.markdown_table([r for r in rows
                                                                    if r.op == op]))
    return "".join(report)


def _sweep_cases():
    """(family, sample name, dtype, tilesmith call, float64 reference, PyTorch baseline) for
    the forward of every sample of every op family: what make bench checks without a GPU."""
    import tilesmith
    from tilesmith import testing
    # PyTorch's SDPA, safe for the samples with no heads (torch 2.11's crashes on them).
    from tilesmith.ops.attention import pytorch_sdpa
    from tilesmith.ops.conv2d import _torch_conv2d
    from tilesmith.ops.gemm import _torch_gemm

    def double(value):
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() \
            else value

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for s in testing.matmul_sample_inputs("cpu", dtype):
            a, b = s.args
            yield ("matmul", s.name, dtype, lambda a=a, b=b: tilesmith.ops.matmul(
                a, b, backend="triton"), torch.matmul(a.double(), b.double()), torch.matmul(a, b))
        for s in testing.gemm_sample_inputs("cpu", dtype):
            a, b = s.args
            kw = dict(s.kwargs)
            out_dtype = kw.pop("out_dtype", None) or dtype
            expr = (kw.get("bias"), kw.get("residual"), kw.get("activation"),
                    float(kw.get("alpha", 1.0)))
            yield ("gemm", s.name, dtype, lambda a=a, b=b, s=s: tilesmith.ops.gemm(
                a, b, backend="triton", **s.kwargs),
                _torch_gemm(a.double(), b.double(), *(double(e) for e in expr[:2]), *expr[2:],
                            torch.float64), _torch_gemm(a, b, *expr, out_dtype))
        for s in testing.attention_sample_inputs("cpu", dtype):
            q, k, v = s.args
            kw64 = {key: double(val) for key, val in s.kwargs.items()}
            yield ("attention", s.name, dtype,
                   lambda s=s: tilesmith.ops.scaled_dot_product_attention(
                       *s.args, backend="triton", **s.kwargs),
                pytorch_sdpa(q.double(), k.double(), v.double(), **kw64),
                pytorch_sdpa(q, k, v, **s.kwargs))
        for s in testing.conv2d_sample_inputs("cpu", dtype):
            x, w, b = s.args
            kw = dict(s.kwargs)
            conv_args = (kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                         kw.get("groups", 1), kw.get("activation"))
            residual = kw.get("residual")
            yield ("conv2d", s.name, dtype, lambda s=s: tilesmith.ops.conv2d(
                *s.args, backend="triton", **s.kwargs),
                _torch_conv2d(x.double(), w.double(), double(b), *conv_args, double(residual)),
                _torch_conv2d(x, w, b, *conv_args, residual))


def interpreter_main(args) -> int:
    """Without a GPU: every op family's Triton kernels through the interpreter on every
    forward sample, errors against float64 next to PyTorch's own at the same precision."""
    from tilesmith import testing

    print("No CUDA GPU here: running the correctness sweep of the Triton kernels through the "
          "interpreter (TRITON_INTERPRET=1). Timings need a GPU: run `make bench` there.\n")
    print(f"{'op':9s} {'sample':32s} {'dtype':9s} {'tilesmith err':>14s} {'torch err':>10s}  "
          "verdict")
    failures = count = 0
    for family, name, dtype, call, ref, base in _sweep_cases():
        with testing.poison_outputs():
            out = call()
        try:
            if dtype == torch.float32:
                testing.assert_fp32_close(out, ref)
            else:
                testing.assert_close_to_reference(out, ref, base)
            verdict = "ok"
        except AssertionError as exc:
            verdict, failures = f"FAIL ({exc})", failures + 1
        count += 1
        print(f"{family:9s} {name:32s} {str(dtype)[6:]:9s} {testing.rel_error(out, ref):14.3e} "
              f"{testing.rel_error(base, ref):10.3e}  {verdict}")
    print(f"\n{count - failures} passed, {failures} failed (forward, every sample; gradients "
          "are in make test). Timings need a GPU.")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ops", default="matmul,attention,gemm,fp8,conv2d,examples",
                        help="comma-separated op families")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--pytest-log")
    parser.add_argument("--build-log")
    parser.add_argument("--silence-limit", type=float, default=120,
                        help="seconds an op family's process may print nothing before it is "
                             "stopped (a hang)")
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

"""The benchmark scripts run end to end without a GPU: every op family's sweep, on tiny
shapes, with "cuda" tensors made on the CPU, the cuda backend's ops replaced by the CPU
stand-ins of tests/cuda_standins.py and the Triton kernels run by the interpreter; timing,
peak memory and the measured peak are stubbed (each timed callable still runs). This is what
catches a benchmark that would raise on its first GPU run, where make gpu-report has minutes
for it; the timings themselves need a GPU. Also: a contender that raises costs its own row,
and bench.run's processes per op family outlive a crash, a hang and the time limit."""

import argparse
import importlib
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import HAS_GPU
from torch.overrides import TorchFunctionMode

import cuda_standins
import tilesmith
from bench import harness
from bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(HAS_GPU, reason="on a GPU make gpu-report runs the benchmarks "
                                "themselves")


def _on_the_cpu(value):
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


class _CudaOnTheCpu(TorchFunctionMode):
    """Tensors the benchmarks ask for on "cuda" are made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _on_the_cpu(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_on_the_cpu(a) for a in args)
        return func(*args, **kwargs)


# Each family's sweep cut down to shapes the interpreter runs in seconds, keeping what makes
# its code take every branch (several dtypes, GQA, masks, zero-filled conv channels, ...).
TINY_SWEEPS = {
    "matmul": {"shapes": lambda quick: [("square", (32, 32, 32)), ("llm", (16, 48, 40))]},
    "attention": {"TOKENS": 64, "WIDTH": 256, "MATH_MAX_SEQLEN": 32,
                  "SEQLENS": {"full": [16, 64], "quick": [32]},
                  "DROPOUT_SEQLENS": {"full": [32], "quick": [32]},
                  "MASK_SEQLENS": {"full": [32], "quick": []},
                  "DECODE_CASES": {"full": [(1, 40, 32, False), (2, 40, 8, True)],
                                   "quick": []}},
    "gemm": {"SQUARES": {"full": [32], "quick": [32]},
             "LLM": {"full": [(16, 48, 40)], "quick": [(24, 40, 32)]},
             "TRAINING_SHAPES": {"full": [(32, 48, 40)], "quick": [(16, 32, 32)]},
             "FP8_SHAPES": {"full": [(32, 48, 160), (8, 16, 64)], "quick": [(16, 32, 128)]},
             "FLOAT8_LINEAR_SIZE": {"full": 48, "quick": 32}},
    "conv2d": {"_layers": lambda quick: [
        (("stem_7x7", 3, 8, 12, 7, 2), 2), (("l1_3x3_64", 8, 8, 7, 3, 1), 2),
        (("l3_1x1_1024_256", 16, 8, 5, 1, 1), 2), (("l3_3x3_256_s2", 8, 16, 6, 3, 2), 1),
        (("l2_1x1_128_512", 8, 32, 5, 1, 1), 1)],  # 4x wider: the residual mode too
               "INFERENCE": ("tiny_cnn", lambda: torch.nn.Sequential(
                   torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                   torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, bias=False),
                   torch.nn.BatchNorm2d(16), torch.nn.ReLU(inplace=True), _ResidualBlock(16),
                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4)),
                   2, 9)},
}


class _ResidualBlock(torch.nn.Module):
    """relu(bn(conv(x)) + x): its sum and ReLU go into the conv's epilogue."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


EXAMPLE_SIZES = {"cifar_resnet": ["--batch-size", "8", "--width", "8", "--blocks", "1"],
                 "gpt_char": ["--batch-size", "2", "--seq-len", "32", "--d-model", "32",
                              "--heads", "2", "--layers", "1", "--max-chars", "20000"]}


@pytest.fixture
def dry_run(monkeypatch):
    """The benchmarks' GPU code path on the CPU; yields the stand-ins' call counter and
    the callables timed."""
    timed = []

    def median_ms(fn, *args, **kwargs):
        fn()
        timed.append(fn)
        return 1.0

    monkeypatch.setattr(harness, "median_ms", median_ms)
    monkeypatch.setattr(harness, "peak_memory", lambda fn: (fn(), 0)[1])
    monkeypatch.setattr(harness, "measured_peak_tflops", lambda dtype: 100.0)
    monkeypatch.setattr(harness, "environment", lambda: {"gpu": "dry run"})
    contenders = harness.contenders
    monkeypatch.setattr(harness, "contenders", lambda op, backends, device, dtype: contenders(
        op, backends, _on_the_cpu(device), dtype))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))  # Hopper
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # inductor: minutes on CPU
    for family, patches in TINY_SWEEPS.items():
        module = importlib.import_module(f"bench.{family}")
        for name, value in patches.items():
            monkeypatch.setattr(module, name, value)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    for name, sizes in EXAMPLE_SIZES.items():
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "main", lambda argv, main=module.main, sizes=sizes:
                            main([*argv, *sizes, "--steps", "3"]))
    with cuda_standins.enabled() as calls, _CudaOnTheCpu():
        yield types.SimpleNamespace(calls=calls, timed=timed)


def _args(out, quick=False, ops="matmul"):
    return argparse.Namespace(quick=quick, ops=ops, out=out, build_log=None, pytest_log=None,
                              silence_limit=120)


OUR_OPS = {"matmul": ["matmul_cuda"], "attention": ["attention_fwd_cuda", "attention_bwd_cuda"],
           "gemm": ["gemm_cuda", "activation_backward_cuda"], "fp8": ["scaled_gemm_cuda"],
           "conv2d": ["conv2d_fwd_cuda", "conv2d_dgrad_cuda", "conv2d_wgrad_cuda"]}


# The quick sweeps of the other families take no path that their full ones do not.
@pytest.mark.parametrize("family,quick", [(f, False) for f in bench_run.FAMILIES]
                         + [(f, True) for f in ("attention", "gemm", "fp8")])
def test_every_family_runs_its_sweep(family, quick, dry_run, tmp_path):
    assert bench_run.run_family(_args(tmp_path, quick, family), family) == 0
    rows, _, _ = harness.read_results(tmp_path / "results.json")
    assert rows and not [r for r in rows if r.ms is None], [r.note for r in rows]
    ours = {r.backend for r in rows}
    if family == "examples":
        assert {r.op for r in rows} == {"train_cifar_resnet", "train_gpt_char",
                                        "train_gpt_char_fp8"}
    elif family == "conv2d":
        inference = {r.backend: r for r in rows if r.op == "tiny_cnn_inference"}
        assert set(inference) == {"torch", "torch_folded", "triton", "cuda", "cuda-sm80"}
        for backend in ("triton", "cuda", "cuda-sm80"):
            extra = inference[backend].extra
            assert (extra["folded"], extra["fused"], extra["residuals"]) == (3, 3, 1), extra
        residual = {r.backend for r in rows if r.mode == "residual"}
        assert residual == {"torch", "triton", "cuda", "cuda-sm80"}, residual
    else:
        # Both of our backends ran (the cuda one as each of its kernel variants on Hopper).
        assert {"triton", "cuda"} <= {b.removeprefix("float8_linear_").split("_")[0]
                                      for b in ours}, ours
        for op in OUR_OPS[family]:
            assert dry_run.calls[op] > 0, (op, dict(dry_run.calls))
        assert dry_run.timed
    if family == "fp8":  # scaled_gemm with the MLP's epilogue, on both backends
        epilogue = {r.backend.split("-")[0] for r in rows if r.mode == "fwd_epilogue"}
        assert epilogue == {"triton", "cuda"}, epilogue
    assert "# tilesmith GPU report" in (tmp_path / "report.md").read_text()


def test_a_contender_that_raises_costs_its_own_row(dry_run, tmp_path, monkeypatch):
    """The cuda matmul raising (a kernel that has never run, say): its rows say FAILED with
    the error, the report lists them and shows the targets as failed, the Triton rows of
    the same sweep are there."""
    matmul = tilesmith.ops.matmul

    def failing_on_cuda(a, b, *, backend=None):
        if backend == "cuda":
            raise RuntimeError("CUDA error: too many resources requested for launch")
        return matmul(a, b, backend=backend)

    monkeypatch.setattr(tilesmith.ops, "matmul", failing_on_cuda)
    bench_run.TARGETS.append(("matmul", "cuda", "bfloat16", {"M": 32, "N": 32, "K": 32}, 0.85,
                              "fwd"))
    try:
        assert bench_run.run_family(_args(tmp_path), "matmul") == 0
        report = (tmp_path / "report.md").read_text()
    finally:
        bench_run.TARGETS.pop()
    rows, _, _ = harness.read_results(tmp_path / "results.json")
    failed = [r for r in rows if r.ms is None]
    assert {r.backend for r in failed} == {"cuda", "cuda-sm80", "cuda-cp-async"}
    assert all(r.note == "FAILED RuntimeError: CUDA error: too many resources requested for "
               "launch" and r.ratio is None for r in failed)
    assert [r for r in rows if r.backend == "triton" and r.ms is not None]
    assert f"## Failures ({len(failed)})" in report
    assert "| matmul fwd | cuda | bfloat16 | 32×32×32 | ≥ 0.85 | FAILED ❌ |" in report


def test_failure_rows_and_a_lost_cuda_context(monkeypatch):
    rows = []
    with harness.contender(rows, op="gemm", mode="fwd", backend="cuda", baseline="cublas",
                           dtype="bfloat16", shape={"M": 8}, baseline_ms=2.0):
        raise ValueError("bad\nthing")
    assert len(rows) == 1 and rows[0].ms is None and rows[0].baseline_ms == 2.0
    assert rows[0].note == "FAILED ValueError: bad thing"
    assert harness.brief(rows[0], "{backend} {tflops:.0f}") == "cuda fwd FAILED"
    with pytest.raises(KeyboardInterrupt):  # the time limit is not a failure of the contender
        with harness.contender(rows, op="gemm", mode="fwd", backend="cuda", baseline="cublas"):
            raise KeyboardInterrupt
    # After a kernel fault nothing more can be measured in the process: raised, not a row.
    monkeypatch.setattr(harness, "cuda_context_usable", lambda: False)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        with harness.contender(rows, op="gemm", mode="fwd", backend="cuda", baseline="cublas"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    assert len(rows) == 1


# A stand-in for `python -m bench.run --ops FAMILY --out DIR`: writes one row, then ends as
# the family's name says.
FAKE_FAMILY = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from bench import harness
    family, out = sys.argv[1], Path(sys.argv[2])
    row = harness.Row(family, "fwd", "cuda", "cublas", "bfloat16", {"M": 1}, 1.0, 1.0, 1.0,
                      1.0, None)
    harness.write_results([row], {"gpu": "fake"}, out, {"bfloat16": 1.0})
    (out / f"{family}.png").write_bytes(b"png")
    print(family, "measured one row", flush=True)
    if family == "crash":  # a kernel fault that takes the process down
        os._exit(134)
    if family == "hang":  # a kernel that never returns
        time.sleep(60)
    if family == "time_limit":  # make gpu-report's SIGINT, which reaches the whole group
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(0.5)
        sys.exit(130)
""")

# The silence limit leaves room for a family's import of torch, which takes seconds on a
# loaded machine (make test runs a pytest worker per core).
ORCHESTRATE = textwrap.dedent("""
    import argparse, sys
    from pathlib import Path
    from bench import run
    out = Path(sys.argv[1])
    families = sys.argv[2].split(",")
    args = argparse.Namespace(quick=True, out=out, build_log=None, pytest_log=None,
                              silence_limit=15)
    command = lambda family, family_out, quick: [sys.executable, "-c", sys.argv[3], family,
                                                 str(family_out)]
    sys.exit(run.run_families(args, families, family_command=command))
""")


def _orchestrate(tmp_path, families):
    result = subprocess.run([sys.executable, "-c", ORCHESTRATE, str(tmp_path),
                             ",".join(families), FAKE_FAMILY], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    data = json.loads((tmp_path / "results.json").read_text())
    return result, data, (tmp_path / "report.md").read_text()


def test_each_family_outlives_the_others_crash_and_hang(tmp_path):
    result, data, report = _orchestrate(tmp_path, ["ok", "crash", "hang", "last"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert [row["op"] for row in data["rows"]] == ["ok", "crash", "hang", "last"]
    how = data["processes"]
    assert how["ok"].startswith("ok in") and how["last"].startswith("ok in")
    assert how["crash"].startswith("exited with rc 134") and how["crash"].endswith("1 rows")
    assert how["hang"].startswith("printed nothing for 15 s: stopped after")
    assert "## Benchmark processes" in report and "| hang | printed nothing" in report
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "crash.png", "hang.png", "last.png", "ok.png"]
    assert "hang measured one row" in result.stdout  # the families' output passes through
    assert data["env"] == {"gpu": "fake"}


def test_the_time_limit_keeps_what_was_measured_and_starts_nothing_more(tmp_path):
    result, data, report = _orchestrate(tmp_path, ["ok", "time_limit", "never"])
    assert result.returncode == 130, result.stdout + result.stderr
    assert [row["op"] for row in data["rows"]] == ["ok", "time_limit"]
    assert data["processes"]["time_limit"].startswith("stopped by the time limit")
    assert data["processes"]["never"] == "not run: the time limit came first"
    assert "| never | not run: the time limit came first |" in report

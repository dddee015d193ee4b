"""The shared benchmark harness (GUIDE §4).

Every row is measured in the same process and run as its baseline: median time of
``triton.testing.do_bench`` (events, L2 flushed before each repetition, randn inputs),
TFLOP/s, ratio baseline_ms / ms, % of the peak measured on this GPU in this run, relative
error against float64, peak memory, and joules per call where NVML reports energy.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    op: str
    mode: str  # fwd | bwd | fwd+bwd; conv2d: fused, dgrad, wgrad; attention: decode;
    #            fp8_gemm: fwd_epilogue (bias, activation and residual in the kernel)
    backend: str
    baseline: str
    dtype: str
    shape: dict
    ms: float | None
    tflops: float | None
    baseline_ms: float | None
    ratio: float | None
    rel_err: float | None
    baseline_rel_err: float | None = None
    pct_of_peak: float | None = None
    peak_mem_bytes: int | None = None
    joules: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---- environment -----------------------------------------------------------------------------

def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment() -> dict:
    import triton

    env = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        or None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) or None,
        "dirty": bool(_run(["git", "-C", str(ROOT), "status", "--porcelain",
                            "--untracked-files=no"])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # "0" where the TMA kernels were turned off (tools/gpu_report.sh after a failed probe)
        "tilesmith_tma_kernels": os.environ.get("TILESMITH_TMA_KERNELS", "1"),
    }
    if torch.cuda.is_available():
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        clocks = _run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,"
                       "power.limit,temperature.gpu", "--format=csv,noheader"])
        env["clocks_sm_maxsm_mem_powerlimit_temp"] = clocks or None
    return env


# ---- energy ----------------------------------------------------------------------------------

class EnergyMeter:
    """Total energy counter of GPU 0 through NVML (libnvidia-ml, loaded with ctypes so no
    Python package is needed), in joules; ``available`` is False where NVML or the counter
    is missing (then rows carry joules=None)."""

    def __init__(self):
        self.available = False
        try:
            self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if self._nvml.nvmlInit_v2() != 0:
                return
            self._handle = ctypes.c_void_p()
            index = torch.cuda.current_device()
            if self._nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self._handle)) != 0:
                return
            self.available = self.read() is not None
        except (OSError, AttributeError):
            self.available = False

    def read(self) -> float | None:
        value = ctypes.c_ulonglong()
        if self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(value)):
            return None
        return value.value / 1000.0  # millijoules -> joules


def joules_per_call(fn, meter: EnergyMeter, min_seconds: float = 1.0) -> float | None:
    """Energy per call over a loop of at least ``min_seconds`` (the counter's resolution
    is coarse)."""
    if not meter.available:
        return None
    fn()
    torch.cuda.synchronize()
    calls, start_j, start_t = 0, meter.read(), time.perf_counter()
    while time.perf_counter() - start_t < min_seconds:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
    end_j = meter.read()
    if start_j is None or end_j is None:
        return None
    return (end_j - start_j) / calls


# ---- failures -------------------------------------------------------------------------------

def cuda_context_usable() -> bool:
    """Whether this process can still run CUDA work. After a kernel fault (an illegal
    address, say) the context is lost and every later launch fails too."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return True
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2
    except RuntimeError:
        return False


def failure_row(exc: Exception, **fields) -> Row:
    """The row of a contender that raised: no timing, the error in its note, so that the
    report says what failed where. ``fields``: op, mode, backend, baseline, dtype, shape and
    any others of Row. Raises ``exc`` again if it left the CUDA context unusable: nothing
    more can be measured in this process (bench.run then loses only this op family)."""
    if not cuda_context_usable():
        raise exc
    text = " ".join(str(exc).split())[:240]
    print(f"  FAILED {fields['op']} {fields['mode']} {fields['backend']}: "
          f"{type(exc).__name__}: {text}", flush=True)
    return Row(**{"ms": None, "tflops": None, "baseline_ms": None, "ratio": None,
                  "rel_err": None, **fields, "note": f"FAILED {type(exc).__name__}: {text}"})


@contextlib.contextmanager
def contender(rows: list[Row], **fields):
    """The block that measures one contender and appends its row to ``rows``. It says what
    it starts (so that a run that hangs shows where), and if it raises, appends
    ``failure_row`` instead: one contender that fails costs its own row, not the sweep."""
    print(f"  .. {fields['op']} {fields['mode']} {fields['backend']} "
          f"{fields.get('dtype', '')} {shape_text(fields.get('shape', {}))}", flush=True)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported in the row; KeyboardInterrupt passes
        rows.append(failure_row(exc, **fields))


def brief(row: Row, template: str) -> str:
    """``template`` filled from the row's fields for a progress line, or "<backend> FAILED"."""
    if row.ms is None:
        return f"{row.backend} {row.mode} FAILED"
    return template.format(**asdict(row))


# ---- timing ----------------------------------------------------------------------------------

def median_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    import triton.testing

    result = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)


def contenders(op: str, backends, device, dtype):
    """(label, backend, switches) for each of our backends that runs `op` here, to run under
    ``tilesmith.backend.hopper_kernels(**switches)``. On an H100 the cuda backend more than
    once: "cuda" (wgmma, what users get), "cuda-sm80" (the mma.sync kernels; not for
    fp8) and, for matmul, gemm, fp8 and attention, "cuda-cp-async" (the wgmma kernels that
    load with cp.async, not the TMA; attention: its forward)."""
    import tilesmith

    hopper_kernels_run = (torch.cuda.get_device_capability(device) == (9, 0)
                          and tilesmith.backend._C is not None
                          and tilesmith.backend._C_SM90A is not None)
    for name in backends:
        if tilesmith.backend.unavailable_reason(name, op, device, dtype):
            continue
        yield name, name, {}
        if name == "cuda" and hopper_kernels_run:
            if op != "fp8":  # FP8 runs on sm_90a only
                yield "cuda-sm80", "cuda", {"enabled": False}
            if op in ("matmul", "gemm", "fp8", "attention"):
                yield "cuda-cp-async", "cuda", {"tma": False}


def peak_memory(fn) -> int:
    """Peak bytes allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measured_peak_tflops(dtype: torch.dtype) -> float:
    """The matmul rate cuBLAS reaches on this GPU now (8192^3, randn): the roof that
    '% of peak' refers to, measured in the same run instead of taken from a datasheet."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = median_ms(lambda: torch.matmul(a, b))
    return 2 * n**3 / ms / 1e9


# ---- output ----------------------------------------------------------------------------------

def write_text_atomically(path: Path, text: str) -> None:
    """path's new text, or its old one: never half a file, whenever the process is killed."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_results(rows: list[Row], env: dict, out_dir: Path, peaks: dict,
                  **more) -> None:
    """out_dir/results.json: env, measured_peaks_tflops, rows, and the entries of ``more``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "measured_peaks_tflops": peaks, "rows": [asdict(r) for r in rows],
               **more}
    write_text_atomically(out_dir / "results.json", json.dumps(payload, indent=1))


def read_results(path: Path) -> tuple[list[Row], dict, dict]:
    """(rows, measured peaks, env) of a results.json that write_results wrote."""
    data = json.loads(path.read_text())
    return ([Row(**row) for row in data["rows"]], data["measured_peaks_tflops"],
            data["env"])


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def shape_text(shape: dict) -> str:
    return "×".join(str(v) for v in shape.values())


def markdown_table(rows: list[Row]) -> str:
    head = ("| op | mode | backend | dtype | shape | ms | TFLOP/s | vs | baseline ms | ratio "
            "| % peak | rel err | base rel err | peak MiB | J/call |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        shape = shape_text(r.shape)
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        lines.append(
            f"| {r.op} | {r.mode} | {r.backend} | {r.dtype} | {shape} | {_fmt(r.ms, '.4f')} "
            f"| {_fmt(r.tflops, '.1f')} | {r.baseline} | {_fmt(r.baseline_ms, '.4f')} "
            f"| {_fmt(r.ratio, '.3f')} | {_fmt(r.pct_of_peak, '.1f')} | {_fmt(r.rel_err, '.2e')} "
            f"| {_fmt(r.baseline_rel_err, '.2e')} | {_fmt(mem, '.1f')} | {_fmt(r.joules, '.4f')} |"
            + (f" {r.note}" if r.note else ""))
    return head + "\n".join(lines) + "\n"


def script_main(doc: str, name: str, *runs, plot_title: str | None = None) -> None:
    """The command line of a benchmark script: --quick, --out DIR; runs each of ``runs``
    (functions of ``quick`` returning rows), writes DIR/results.json and DIR/<name>.md, and
    a plot of the ratios when ``plot_title`` is given."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    rows = [row for run in runs for row in run(args.quick)]
    write_results(rows, environment(), args.out, {})
    (args.out / f"{name}.md").write_text(markdown_table(rows))
    if plot_title:
        plot_ratios([r for r in rows if r.ratio is not None and r.baseline_ms != r.ms],
                    args.out / f"{name}.png", plot_title)
    print(markdown_table(rows))


def plot_ratios(rows: list[Row], path: Path, title: str) -> bool:
    """One bar per (backend, dtype, shape): ratio to the baseline; 1.0 drawn as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r.ratio is not None]
    if not timed:
        return False
    labels = [f"{r.backend} {r.dtype} {shape_text(r.shape)}" for r in timed]
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(timed)), 5))
    colors = {"cuda": "tab:green", "triton": "tab:blue"}
    ax.bar(range(len(timed)), [r.ratio for r in timed],
           color=[colors.get(r.backend, "tab:gray") for r in timed])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(timed)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("speed vs baseline (baseline ms / ms)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

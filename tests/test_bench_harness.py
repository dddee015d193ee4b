"""The benchmark harness's report code, exercised without a GPU on made-up rows (the
timings themselves need a GPU; this keeps the code that formats them from breaking
unnoticed between GPU sessions)."""

import argparse
import dataclasses
import json

import pytest

from bench import harness
from bench import run as bench_run


def _rows():
    shape = {"M": 4096, "N": 4096, "K": 4096}
    return [
        harness.Row("matmul", "fwd", "torch", "cublas", "bfloat16", shape, 0.2, 687.0, 0.2, 1.0,
                    1e-3, 1e-3, 86.0, 1024, None),
        harness.Row("matmul", "fwd", "triton", "cublas", "bfloat16", shape, 0.25, 550.0, 0.2,
                    0.8, 1.1e-3, 1e-3, 69.0, 1024, 0.05),
    ]


def test_results_json_has_the_documented_shape(tmp_path):
    env = {"gpu": "test", "driver": None, "cuda": None, "torch": "x", "triton": "y",
           "commit": None, "date": "2026-01-01"}
    harness.write_results(_rows(), env, tmp_path, {"bfloat16": 800.0})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["env"]["gpu"] == "test"
    for key in ("op", "mode", "backend", "baseline", "dtype", "shape", "ms", "tflops",
                "baseline_ms", "ratio", "rel_err", "peak_mem_bytes", "joules"):
        assert key in data["rows"][0], key


def test_markdown_report_shows_targets_and_rows(tmp_path):
    args = argparse.Namespace(build_log=None, pytest_log=None, out=tmp_path)
    report = bench_run.render_report(_rows(), {"bfloat16": 800.0}, {"gpu": "test"}, args)
    assert "| matmul fwd | triton | bfloat16 | 4096×4096×4096 | ≥ 0.9 | 0.800 ❌ |" in report
    assert "| matmul fwd | cuda | bfloat16 | 4096×4096×4096 | ≥ 0.85 | not run |" in report
    assert ("| attention bwd | triton | bfloat16 | 16×16×1024×128×False | ≥ 0.6 | not run |"
            in report)
    assert report.count("| matmul | fwd |") == 2


def test_ratio_plot_is_written(tmp_path):
    """make bench's bar chart of ratios (matplotlib is installed by `make test`, and is on
    the GPU machine, where a plot that raised would end the benchmark stage)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "matmul.png"
    assert harness.plot_ratios(_rows(), path, "matmul vs cuBLAS (same run)")
    assert path.read_bytes().startswith(b"\x89PNG")
    untimed = [dataclasses.replace(row, ratio=None) for row in _rows()]
    assert not harness.plot_ratios(untimed, tmp_path / "none.png", "nothing timed")
    assert not (tmp_path / "none.png").exists()

"""The two end-to-end examples as benchmark rows: training step time of the tilesmith model
against the native one (same seed, same data, same run), and how far apart their losses end;
the CIFAR ResNet's row also holds its inference comparison (``extra["inference"]``: the
trained model as optimize_for_inference makes it against the native one in eval mode), the
GPT's its generation (``extra["generation"]``: tokens per second with a KV cache, both).

    python -m bench.examples [--quick] [--out DIR]

Default sizes are the examples' own (CIFAR ResNet: batch 512, bf16 autocast, channels_last;
GPT: seq 1024, d_model 768, bf16; and, in the full sweep, the GPT again with its blocks'
Linear layers in FP8, train_gpt_char_fp8); --quick trains fewer steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import harness

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(quick: bool = False, checkpoint=None, out_dir: Path = Path("bench/out")):
    sys.path.insert(0, str(EXAMPLES))
    import cifar_resnet
    import gpt_char

    steps = "40" if quick else "200"
    rows = []
    runs = [("train_cifar_resnet", cifar_resnet, "images", []),
            ("train_gpt_char", gpt_char, "tokens", [])]
    if not quick:  # the GPT's blocks in FP8 (Float8Linear, row-wise) against native bf16
        runs.append(("train_gpt_char_fp8", gpt_char, "tokens", ["--fp8", "row"]))
    for name, module, unit, extra in runs:
        with harness.contender(rows, op=name, mode="fwd+bwd", backend="tilesmith",
                               baseline="native_eager", dtype="bfloat16",
                               shape={"steps": int(steps)}):
            results, _ = module.main(["--steps", steps, "--out", str(out_dir), *extra])
            native, ours = results["native"], results["tilesmith"]
            tail = max(1, len(native["losses"]) // 10)
            final_native = sum(native["losses"][-tail:]) / tail
            final_ours = sum(ours["losses"][-tail:]) / tail
            rows.append(harness.Row(
                op=name, mode="fwd+bwd", backend="tilesmith", baseline="native_eager",
                dtype="bfloat16", shape={"steps": int(steps)}, ms=ours["step_s"] * 1e3,
                tflops=None, baseline_ms=native["step_s"] * 1e3,
                ratio=native["step_s"] / ours["step_s"],
                rel_err=abs(final_ours - final_native) / abs(final_native),
                peak_mem_bytes=ours["peak_mem_bytes"], joules=None,
                note=f"final loss {final_ours:.4f} vs native {final_native:.4f}",
                extra={f"{unit}_per_s": ours["items_per_s"],
                       f"native_{unit}_per_s": native["items_per_s"],
                       "native_peak_mem_bytes": native["peak_mem_bytes"],
                       "losses": ours["losses"], "native_losses": native["losses"],
                       # the CIFAR ResNet's: its trained model at inference (one batch);
                       # the GPT's: greedy generation with a KV cache
                       "inference": results.get("inference"),
                       "generation": results.get("generation")}))
        if checkpoint:
            checkpoint(rows)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    rows = run(args.quick, out_dir=args.out)
    print(harness.markdown_table(rows))


if __name__ == "__main__":
    main()

"""What both examples share: distributed setup, the side-by-side training loop (native
torch and tilesmith from the same seed), the report, the plot."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tilesmith.backend import BACKENDS  # noqa: F401  (the examples' --backend choices)


def positive_int(text: str) -> int:
    """argparse type of the step counts and sizes: a bad one is a usage error, not a
    traceback halfway through training."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def setup_distributed(device: str):
    """(rank, world_size). Under torchrun (WORLD_SIZE set) joins the process group: NCCL on
    GPUs, gloo on the CPU; one GPU per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def distributed(model, device: str, world: int):
    """``model`` wrapped in DistributedDataParallel when there are several processes."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)


def finish(world: int) -> None:
    if world > 1:
        # Every rank past its last collective before any tears the group down (a rank
        # exiting first can abort the others' gloo threads).
        dist.barrier()
        dist.destroy_process_group()


def autocast_context(device: str, amp: str):
    if amp == "none":
        return torch.autocast(device.split(":")[0], enabled=False)
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, amp))


def progress(step: int, total: int, loss: float, label: str, rank: int) -> None:
    if rank != 0:
        return
    width = 30
    done = int(width * (step + 1) / total)
    sys.stderr.write(f"\r{label:>9} [{'#' * done}{'.' * (width - done)}] {step + 1}/{total} "
                     f"loss {loss:.4f}")
    if step + 1 == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def train(model, batches, loss_fn, *, steps, lr, device, amp, label, rank, items_per_batch):
    """Adam for ``steps`` steps; returns losses, median step seconds (after 3 warm-up steps),
    items per second and peak memory."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(enabled=amp == "float16")
    losses, times = [], []
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        inputs, targets = next(batches)
        start = time.perf_counter()
        with autocast_context(device, amp):
            loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        progress(step, steps, losses[-1], label, rank)
    timed = sorted(times[3:] or times)
    step_s = timed[len(timed) // 2]
    return {"losses": losses, "step_s": step_s, "items_per_s": items_per_batch / step_s,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def median_seconds(fn, device: str, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after two warm-up calls, the GPU
    synchronized around each."""
    cuda = device.startswith("cuda")
    times = []
    for call in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if call >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def report(native: dict, ours: dict, *, unit: str, tolerance: float, out_dir: Path | None,
           title: str, rank: int) -> bool:
    """Prints the loss curves side by side and the verdict; writes JSON and a PNG."""
    if rank != 0:
        return True
    n = len(native["losses"])
    every = max(1, n // 10)
    print(f"\n{'step':>6} {'native loss':>12} {'tilesmith loss':>15}")
    for i in list(range(0, n, every)) + ([n - 1] if (n - 1) % every else []):
        print(f"{i:>6} {native['losses'][i]:>12.4f} {ours['losses'][i]:>15.4f}")
    # Final loss: mean of the last 10% of steps (one step is noisy).
    tail = max(1, n // 10)
    final_native = sum(native["losses"][-tail:]) / tail
    final_ours = sum(ours["losses"][-tail:]) / tail
    rel = abs(final_ours - final_native) / max(abs(final_native), 1e-12)
    speed = native["step_s"] / ours["step_s"]

    def mem(result):
        peak = result["peak_mem_bytes"]
        return "n/a" if peak is None else f"{peak / 2**20:.0f} MiB"

    print(f"\nstep time: native {native['step_s'] * 1e3:.1f} ms, tilesmith "
          f"{ours['step_s'] * 1e3:.1f} ms ({speed:.2f}x); {unit}/s: native "
          f"{native['items_per_s']:.0f}, tilesmith {ours['items_per_s']:.0f}; peak memory: "
          f"native {mem(native)}, tilesmith {mem(ours)}")
    same = rel <= tolerance
    print(f"verdict: final loss {final_ours:.4f} vs native {final_native:.4f} "
          f"({rel * 100:.2f}% apart, tolerance {tolerance * 100:.1f}%): "
          f"{'SAME' if same else 'DIFFERENT'}; speed {speed:.2f}x native")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{title}.json").write_text(json.dumps(
            {"native": native, "tilesmith": ours, "final_rel_diff": rel, "speed_ratio": speed},
            indent=1))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(native["losses"], label="native torch")
            ax.plot(ours["losses"], label="tilesmith", linestyle="--")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_title(title)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / f"{title}.png", dpi=110)
            plt.close(fig)
        except ImportError:
            print("(matplotlib not installed: no plot)")
    return same

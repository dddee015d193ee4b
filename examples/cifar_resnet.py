"""Train a CIFAR ResNet (ResNet-20 layout) with native torch and with tilesmith, from the
same seed, and compare loss curves, step time, images/s and peak memory. Then the trained
tilesmith model at inference, as tilesmith.nn.optimize_for_inference makes it (BatchNorms
folded into the convolutions, ReLUs fused into them): its logits against the same model in
eval mode, its time per batch against the native model's in eval mode.

    python examples/cifar_resnet.py [--data-dir DIR] [--steps 200] [--batch-size 512]
    torchrun --nproc_per_node=2 examples/cifar_resnet.py ...   # DistributedDataParallel

--data-dir: the standard CIFAR-10 python batches (data_batch_1..5). Without it, a small
dataset in that same file format is generated (class-dependent patterns plus noise) into a
temporary directory, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tilesmith  # noqa: E402


def write_synthetic_cifar(directory: Path, images_per_batch: int = 1000, seed: int = 0) -> Path:
    """Five training batches in CIFAR-10's python format: dicts with b"data" (N x 3072
    uint8, channel-major rows) and b"labels"."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(10, 3072))
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        labels = rng.integers(0, 10, size=images_per_batch)
        noise = rng.normal(0, 60, size=(images_per_batch, 3072))
        data = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        with open(directory / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    return directory


def load_cifar(directory: Path):
    images, labels = [], []
    for i in range(1, 6):
        with open(directory / f"data_batch_{i}", "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels += list(batch[b"labels"])
    x = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32).float() / 255.0
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    return (x - mean) / std, torch.tensor(labels)


class BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(torch.nn.Module):
    def __init__(self, width=16, blocks_per_stage=3, classes=10):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, 2 if stage and not block else 1))
                cin = cout
        self.layers = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def batches(x, y, batch_size, device, channels_last, rank, world, seed):
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        shard = order[rank::world]
        for i in range(0, len(shard) - batch_size + 1, batch_size):
            idx = shard[i:i + batch_size]
            images = x[idx].to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, y[idx].to(device)


def compare_inference(native, ours, images, *, device, amp, backend, rank) -> dict:
    """The trained models in eval mode on one batch: ``ours`` as optimize_for_inference makes
    it against ``ours`` itself (the same weights: how much folding and fusing change the
    logits, and whether the predicted classes stay), and its time against ``native``'s."""
    native.eval()
    ours.eval()
    served = tilesmith.nn.optimize_for_inference(ours, backend=backend)
    with torch.no_grad(), _common.autocast_context(device, amp):
        want, got = ours(images).float(), served(images).float()
        native_s = _common.median_seconds(lambda: native(images), device)
        served_s = _common.median_seconds(lambda: served(images), device)
    result = {"logits_rel_diff": ((got - want).norm() / want.norm()).item(),
              "same_class": (got.argmax(1) == want.argmax(1)).float().mean().item(),
              "native_eval_s": native_s, "optimized_s": served_s}
    if rank == 0:
        print(f"inference (eval mode, batch {len(images)}): native {native_s * 1e3:.2f} ms, "
              f"tilesmith optimize_for_inference {served_s * 1e3:.2f} ms "
              f"({native_s / served_s:.2f}x); its logits {result['logits_rel_diff']:.1e} "
              f"from the unfolded model's, the same class for "
              f"{result['same_class'] * 100:.1f}% of the images")
    return result


def main(argv=None):
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=_common.existing_path)
    parser.add_argument("--steps", type=_common.positive_int, default=200)
    parser.add_argument("--batch-size", type=_common.positive_int, default=512)
    parser.add_argument("--width", type=_common.positive_int, default=16)
    parser.add_argument("--blocks", type=_common.positive_int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--amp", choices=["bfloat16", "float16", "none"],
                        default="bfloat16" if default_device == "cuda" else "none")
    # channels_last is what the GPU kernels want. On the CPU the default is NCHW: torch
    # 2.14's oneDNN (v3.12, AVX2 CPUs) can crash or hang in a channels_last 1x1 stride-2
    # convolution's weight gradient with few channels (the shortcut of --width 4 does it).
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on a GPU, yes; on the CPU, no")
    parser.add_argument("--backend", choices=_common.BACKENDS,
                        default="triton" if default_device == "cuda" else "torch",
                        help="tilesmith backend (default: triton on a GPU; torch on the CPU, "
                        "where the Triton interpreter would take minutes per step)")
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None, help="directory for JSON and PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rank, world = _common.setup_distributed(args.device)
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = write_synthetic_cifar(Path(tempfile.mkdtemp()) / "cifar-10-batches-py")
        if rank == 0:
            print(f"no --data-dir: generated a synthetic CIFAR-10-format dataset in {data_dir}")
    x, y = load_cifar(data_dir)
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = args.device.startswith("cuda")

    torch.manual_seed(args.seed)
    native = CifarResNet(args.width, args.blocks).to(device)
    ours = tilesmith.nn.convert(copy.deepcopy(native), include=("linear", "conv2d"),
                                backend=args.backend)
    if channels_last:
        native = native.to(memory_format=torch.channels_last)
        ours = ours.to(memory_format=torch.channels_last)
    results = {}
    for label, model in (("native", native), ("tilesmith", ours)):
        model = _common.distributed(model, device, world)
        results[label] = _common.train(
            model, batches(x, y, args.batch_size, device, channels_last, rank, world,
                           args.seed), F.cross_entropy, steps=args.steps, lr=args.lr,
            device=device, amp=args.amp, label=label, rank=rank,
            items_per_batch=args.batch_size * world)
    same = _common.report(results["native"], results["tilesmith"], unit="images",
                          tolerance=args.tolerance, out_dir=args.out, title="cifar_resnet",
                          rank=rank)
    images, _ = next(batches(x, y, args.batch_size, device, channels_last, rank, world,
                             args.seed + 1))
    results["inference"] = compare_inference(native, ours, images, device=device,
                                             amp=args.amp, backend=args.backend, rank=rank)
    _common.finish(world)
    return results, same


if __name__ == "__main__":
    main()

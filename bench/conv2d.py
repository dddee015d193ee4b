"""conv2d: tilesmith's implicit-GEMM kernels against cuDNN (through F.conv2d and
aten.convolution_backward), same run, on every distinct conv layer of ResNet-50 (224x224,
batch 32 and 128) and of a CIFAR ResNet (32x32); channels_last, bf16 and fp16.

    python -m bench.conv2d [--quick] [--out DIR]

Modes: fwd (conv + bias), fused (conv + bias + ReLU in one kernel, against cuDNN conv + bias
followed by an eager ReLU), residual (on a bottleneck block's last layer, the 1x1 that
widens 4x: relu(conv + bias + shortcut) in one kernel, against cuDNN conv + bias, then an
eager add and ReLU), dgrad, wgrad. FLOPs 2*N*K*P*Q*C*R*S/groups for each.

Then a whole model: torchvision's ResNet-50 at inference (batch 32, 224x224, bf16,
channels_last) as ``tilesmith.nn.optimize_for_inference`` makes it (BatchNorms folded into
the convolutions, the residual sums and ReLUs after them fused), against the same model in
eval mode on cuDNN and against PyTorch's own fold of its BatchNorms
(torch.fx.experimental.optimization.fuse).
"""

from __future__ import annotations

import copy
import importlib

import torch
import torch.nn.functional as F

import tilesmith
from bench import harness
from tilesmith import testing

conv2d_ops = importlib.import_module("tilesmith.ops.conv2d")  # the module, not the function

# (name, C, K, H, R, stride): H is the input height (= width)
RESNET50 = [
    ("stem_7x7", 3, 64, 224, 7, 2),
    ("l1_1x1_64_64", 64, 64, 56, 1, 1), ("l1_3x3_64", 64, 64, 56, 3, 1),
    ("l1_1x1_64_256", 64, 256, 56, 1, 1), ("l1_1x1_256_64", 256, 64, 56, 1, 1),
    ("l2_1x1_256_128", 256, 128, 56, 1, 1), ("l2_3x3_128_s2", 128, 128, 56, 3, 2),
    ("l2_1x1_128_512", 128, 512, 28, 1, 1), ("l2_down_256_512_s2", 256, 512, 56, 1, 2),
    ("l2_1x1_512_128", 512, 128, 28, 1, 1), ("l2_3x3_128", 128, 128, 28, 3, 1),
    ("l3_1x1_512_256", 512, 256, 28, 1, 1), ("l3_3x3_256_s2", 256, 256, 28, 3, 2),
    ("l3_1x1_256_1024", 256, 1024, 14, 1, 1), ("l3_down_512_1024_s2", 512, 1024, 28, 1, 2),
    ("l3_1x1_1024_256", 1024, 256, 14, 1, 1), ("l3_3x3_256", 256, 256, 14, 3, 1),
    ("l4_1x1_1024_512", 1024, 512, 14, 1, 1), ("l4_3x3_512_s2", 512, 512, 14, 3, 2),
    ("l4_1x1_512_2048", 512, 2048, 7, 1, 1), ("l4_down_1024_2048_s2", 1024, 2048, 14, 1, 2),
    ("l4_1x1_2048_512", 2048, 512, 7, 1, 1), ("l4_3x3_512", 512, 512, 7, 3, 1),
]


def _resnet50() -> torch.nn.Module:
    import torchvision  # raises ImportError where it is not installed

    return torchvision.models.resnet50()


# The model of the inference rows: its name, what makes it, the batch, the image size.
INFERENCE = ("resnet50", _resnet50, 32, 224)
CIFAR = [
    ("cifar_stem", 3, 16, 32, 3, 1), ("cifar_3x3_16", 16, 16, 32, 3, 1),
    ("cifar_3x3_16_32_s2", 16, 32, 32, 3, 2), ("cifar_3x3_32", 32, 32, 16, 3, 1),
    ("cifar_3x3_32_64_s2", 32, 64, 16, 3, 2), ("cifar_3x3_64", 64, 64, 8, 3, 1),
]


def _layers(quick):
    if quick:
        keep = {"stem_7x7", "l1_3x3_64", "l3_1x1_1024_256", "l3_3x3_256"}
        return [(layer, 32) for layer in RESNET50 if layer[0] in keep] + [(CIFAR[1], 128)]
    return ([(layer, b) for b in (32, 128) for layer in RESNET50]
            + [(layer, b) for b in (128, 512) for layer in CIFAR])


def run(quick: bool = False, backends=("triton", "cuda"), checkpoint=None):
    rows = []
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    for (name, c, k, h, r, stride), batch in _layers(quick):
        for dtype in dtypes:
            pad = r // 2
            x = torch.randn(batch, c, h, h, device="cuda", dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            w = torch.randn(k, c, r, r, device="cuda", dtype=dtype).contiguous(
                memory_format=torch.channels_last) / (c * r * r) ** 0.5
            bias = torch.randn(k, device="cuda", dtype=dtype)
            p = (h + 2 * pad - r) // stride + 1
            flops = 2 * batch * k * p * p * c * r * r
            grad = torch.randn(batch, k, p, p, device="cuda", dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            shape = {"layer": name, "N": batch, "C": c, "K": k, "H": h, "R": r, "stride": stride}
            args = ([stride] * 2, [pad] * 2, [1, 1], 1)
            widens = r == 1 and stride == 1 and k == 4 * c  # where a ResNet adds its shortcut
            shortcut = torch.randn_like(grad) if widens else None
            baselines = {
                "fwd": lambda: F.conv2d(x, w, bias, stride, pad),
                "fused": lambda: F.relu(F.conv2d(x, w, bias, stride, pad)),
                "residual": lambda: F.relu(F.conv2d(x, w, bias, stride, pad) + shortcut),
                "dgrad": lambda: torch.ops.aten.convolution_backward(
                    grad, x, w, None, args[0], args[1], args[2], False, [0, 0], 1,
                    [True, False, False])[0],
                "wgrad": lambda: torch.ops.aten.convolution_backward(
                    grad, x, w, None, args[0], args[1], args[2], False, [0, 0], 1,
                    [False, True, False])[1],
            }
            ours = {
                "fwd": lambda be: tilesmith.ops.conv2d(x, w, bias, stride, pad, backend=be),
                "fused": lambda be: tilesmith.ops.conv2d(x, w, bias, stride, pad,
                                                         activation="relu", backend=be),
                "residual": lambda be: tilesmith.ops.conv2d(x, w, bias, stride, pad,
                                                            activation="relu",
                                                            residual=shortcut, backend=be),
                "dgrad": lambda be: (
                    torch.ops.tilesmith.conv2d_dgrad_cuda(grad, w, list(x.shape), *args[:3], True)
                    if be == "cuda" else
                    torch.ops.tilesmith.conv2d_dgrad_triton(grad, w, list(x.shape), *args, True)),
                "wgrad": lambda be: (
                    torch.ops.tilesmith.conv2d_wgrad_cuda(grad, x, list(w.shape), *args[:3])
                    if be == "cuda" else
                    torch.ops.tilesmith.conv2d_wgrad_triton(grad, x, list(w.shape), *args)),
            }
            # Backends that cannot take this layer sit out; so do the cuda dgrad and wgrad
            # ops where the layer's channels are zero-filled (3 input channels): conv2d
            # fills them for the forward and its autograd, these rows call the ops directly.
            limits = conv2d_ops.kernel_limits(x, w)
            filled = conv2d_ops.cuda_zero_padding(c, k, 1) != (1, c, k)
            refs = {"fwd": F.conv2d(x[:1].double(), w.double(), bias.double(), stride, pad)}
            if not widens:
                del baselines["residual"]
            for mode, base_fn in baselines.items():
                base_ms = harness.median_ms(base_fn)
                base_label = {"fused": "cudnn+eager_relu",
                              "residual": "cudnn+eager_add_relu"}.get(mode, "cudnn")
                rows.append(harness.Row(
                    op="conv2d", mode=mode, backend="torch", baseline=base_label,
                    dtype=str(dtype)[6:], shape=shape, ms=base_ms, tflops=flops / base_ms / 1e9,
                    baseline_ms=base_ms, ratio=1.0, rel_err=None, peak_mem_bytes=None,
                    joules=None))
                for label, backend, switches in harness.contenders("conv2d", backends, x.device,
                                                                 dtype):
                    if limits[backend] or (backend == "cuda" and filled
                                           and mode in ("dgrad", "wgrad")):
                        continue
                    def fn(b=backend, m=mode):
                        return ours[m](b)

                    with (harness.contender(rows, op="conv2d", mode=mode, backend=label,
                                            baseline=base_label, dtype=str(dtype)[6:],
                                            shape=shape, baseline_ms=base_ms),
                          tilesmith.backend.hopper_kernels(**switches)):  # outside the timing
                        out = fn()
                        ms = harness.median_ms(fn)
                        rows.append(harness.Row(
                            op="conv2d", mode=mode, backend=label, baseline=base_label,
                            dtype=str(dtype)[6:], shape=shape, ms=ms, tflops=flops / ms / 1e9,
                            baseline_ms=base_ms, ratio=base_ms / ms,
                            rel_err=(testing.rel_error(out[:1], refs["fwd"]) if mode == "fwd"
                                     else None),
                            peak_mem_bytes=harness.peak_memory(fn), joules=None))
            print(f"conv2d {name} N={batch} {str(dtype)[6:]}: " + ", ".join(
                harness.brief(r, "{backend}/{mode} {ratio:.2f}x") for r in rows
                if r.shape == shape and r.backend != "torch" and r.dtype == str(dtype)[6:]),
                flush=True)
            if checkpoint:
                checkpoint(rows)
    run_inference(rows, backends)
    return rows


def run_inference(rows: list, backends=("triton", "cuda")) -> list:
    """Rows "<model>_inference": each of our backends running the model as
    optimize_for_inference makes it, the eval model on cuDNN its baseline; the row
    "torch_folded" is PyTorch's fold of the same BatchNorms on cuDNN (the ratio of ours to it
    in ``extra``, with how many BatchNorms, activations and residual sums ours took into
    its convolutions). rel_err: the first image's output against the float64 model."""
    from torch.fx.experimental.optimization import fuse as torch_fold_batchnorm

    name, make_model, batch, size = INFERENCE
    op, dtype = f"{name}_inference", torch.bfloat16
    shape = {"model": name, "N": batch, "H": size}
    torch.manual_seed(0)
    try:
        model = make_model().eval()
    except ImportError as exc:
        print(f"conv2d: no inference rows ({exc})", flush=True)
        return rows
    with torch.no_grad():
        for module in model.modules():  # statistics of their own, as a trained model's
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        x = torch.randn(batch, 3, size, size, device="cuda")
        ref = copy.deepcopy(model).to("cuda", torch.float64)(x[:1].double())
        native = model.to("cuda", dtype).to(memory_format=torch.channels_last)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        base_ms = harness.median_ms(lambda: native(x))
        base_err = testing.rel_error(native(x[:1]), ref)
        rows.append(harness.Row(
            op=op, mode="fwd", backend="torch", baseline="cudnn_eval", dtype="bfloat16",
            shape=shape, ms=base_ms, tflops=None, baseline_ms=base_ms, ratio=1.0,
            rel_err=base_err, peak_mem_bytes=harness.peak_memory(lambda: native(x)),
            joules=None))
        folded_ms = None
        with harness.contender(rows, op=op, mode="fwd", backend="torch_folded",
                               baseline="cudnn_eval", dtype="bfloat16", shape=shape,
                               baseline_ms=base_ms):
            folded = torch_fold_batchnorm(native)
            folded_ms = harness.median_ms(lambda: folded(x))
            rows.append(harness.Row(
                op=op, mode="fwd", backend="torch_folded", baseline="cudnn_eval",
                dtype="bfloat16", shape=shape, ms=folded_ms, tflops=None,
                baseline_ms=base_ms, ratio=base_ms / folded_ms,
                rel_err=testing.rel_error(folded(x[:1]), ref), baseline_rel_err=base_err,
                peak_mem_bytes=harness.peak_memory(lambda: folded(x)), joules=None))
        for label, backend, switches in harness.contenders("conv2d", backends, x.device,
                                                         dtype):
            with (harness.contender(rows, op=op, mode="fwd", backend=label,
                                    baseline="cudnn_eval", dtype="bfloat16", shape=shape,
                                    baseline_ms=base_ms),
                  tilesmith.backend.hopper_kernels(**switches)):
                ours, report = tilesmith.nn.optimize_for_inference(native, backend=backend,
                                                                   return_report=True)
                ms = harness.median_ms(lambda: ours(x))
                rows.append(harness.Row(
                    op=op, mode="fwd", backend=label, baseline="cudnn_eval",
                    dtype="bfloat16", shape=shape, ms=ms, tflops=None, baseline_ms=base_ms,
                    ratio=base_ms / ms, rel_err=testing.rel_error(ours(x[:1]), ref),
                    baseline_rel_err=base_err,
                    peak_mem_bytes=harness.peak_memory(lambda: ours(x)), joules=None,
                    extra={"ratio_vs_torch_folded": folded_ms / ms if folded_ms else None,
                           "folded": len(report.folded), "fused": len(report.fused),
                           "residuals": len(report.residuals)}))
    print(f"{op} N={batch}: " + ", ".join(
        harness.brief(r, "{backend} {ratio:.2f}x") for r in rows if r.op == op), flush=True)
    return rows


def main():
    harness.script_main(__doc__, "conv2d", run, plot_title="conv2d vs cuDNN (same run)")


if __name__ == "__main__":
    main()

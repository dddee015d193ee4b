"""Compile every Triton kernel tilesmith launches, for real GPU targets, on a machine without
a GPU: the launches that the ops make on representative inputs are recorded instead of run,
and each (kernel, argument types, constexprs, config) is compiled ahead of time down to a
cubin with Triton's own ptxas. Catches what the interpreter cannot: unsupported dtype
combinations, layouts, type errors in the compiled dialect; and, from each cubin's resource
report, a fixed (not autotuned) launch on 16-bit or fp8 data that spills registers or needs
more shared memory than the target has (see _compile for what is only noted).

The arguments are specialised as on a GPU (alignment, divisibility by 16), so registers and
shared memory are those of the real launch; the inputs are small, so a kernel whose tiles
depend on the shape is covered for the shapes recorded here only.

    python tools/compile_kernels.py [--targets 80,90] [--jobs 2]

Must run without TRITON_INTERPRET (it compiles, it does not interpret).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

import torch  # noqa: E402
import triton  # noqa: E402

class Recorder:
    """Stands in for torch.library.wrap_triton: records launches, runs nothing."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        def launcher(grid):
            def launch(*args, **kwargs):
                self.launches.append((kernel, args, kwargs))
            return launch

        class Indexable:
            def __getitem__(self, grid):
                return launcher(grid)

        return Indexable()


def record_launches():
    """Every distinct Triton launch the ops make on a set of representative calls."""
    import importlib

    import tilesmith
    from tilesmith import backend
    from tilesmith.ops.fp8 import scaled_gemm_with_pre
    from tilesmith.ops.gemm import ACTIVATION_NAMES

    recorder = Recorder()
    # By module path: tilesmith.ops.matmul (the attribute) is the function, not the module.
    for name in ("attention", "conv2d", "fp8", "gemm", "matmul"):
        importlib.import_module(f"tilesmith.ops.{name}").wrap_triton = recorder
    # The ops run on CPU tensors here; only the recorder sees their launches.
    backend.unavailable_reason = lambda name, op, device, dtype=None: (
        None if name in ("triton", "torch") else "compile check: triton only")

    def grad(out, *inputs):
        torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

    bf16 = torch.bfloat16
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.randn(64, 32, dtype=dtype, requires_grad=True)
        b = torch.randn(32, 48, dtype=dtype, requires_grad=True)
        grad(tilesmith.ops.matmul(a, b, backend="triton"), a, b)
        bias = torch.randn(48, dtype=dtype, requires_grad=True)
        for act in ACTIVATION_NAMES:
            grad(tilesmith.ops.gemm(a, b, bias=bias, activation=act,
                                    residual=torch.randn(64, 48, dtype=dtype), alpha=0.5,
                                    backend="triton"), a, b, bias)
        # The activation backward without a bias gradient (its other specialisation).
        grad(tilesmith.ops.gemm(a, b, activation="gelu", backend="triton"), a, b)
    a = torch.randn(4, 64, 32, dtype=bf16)
    tilesmith.ops.matmul(a, a.transpose(1, 2), backend="triton")
    for head_dim in (64, 128, 256):
        q = torch.randn(2, 4, 64, head_dim, dtype=bf16, requires_grad=True)
        kv = torch.randn(2, 2, 64, head_dim, dtype=bf16, requires_grad=True)
        for kwargs in ({}, {"is_causal": True},
                       {"attn_mask": torch.randn(1, 4, 64, 64, dtype=bf16, requires_grad=True)},
                       {"attn_mask": torch.rand(2, 1, 64, 64) > 0.5},
                       {"dropout_p": 0.6,
                        "attn_mask": torch.randn(1, 4, 64, 64, dtype=bf16, requires_grad=True)}):
            out = tilesmith.ops.scaled_dot_product_attention(q, kv, kv, enable_gqa=True,
                                                             backend="triton", **kwargs)
            mask = kwargs.get("attn_mask")
            extra = (mask,) if mask is not None and mask.requires_grad else ()
            grad(out, q, kv, *extra)
    # The forward's other specialisations (the calls above pack their GQA groups): one head
    # per kv head, and keys split (with the combine kernel), packed and not.
    q = torch.randn(1, 2, 200, 64, dtype=bf16)
    with tilesmith.ops.attention_split_keys(128):
        tilesmith.ops.scaled_dot_product_attention(q, q, q, backend="triton")
        tilesmith.ops.scaled_dot_product_attention(q[:, :, :1], q[:, :1], q[:, :1],
                                                   enable_gqa=True, backend="triton")
    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
    q = torch.randn(64, 4, 128, dtype=bf16, requires_grad=True)
    k = torch.randn(64, 2, 128, dtype=bf16, requires_grad=True)
    for dropout_p in (0.0, 0.1):
        grad(tilesmith.ops.varlen_attention(q, k, k, cu, cu, 34, 34, causal=True,
                                            dropout_p=dropout_p, backend="triton"), q, k)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 16, 8, 8, dtype=dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(32, 16, 3, 3, dtype=dtype, requires_grad=True)
        bias = torch.randn(32, dtype=dtype, requires_grad=True)
        grad(tilesmith.ops.conv2d(x, w, bias, padding=1, activation="relu", backend="triton"),
             x, w, bias)
        depthwise = torch.randn(16, 1, 3, 3, dtype=dtype, requires_grad=True)
        grad(tilesmith.ops.conv2d(x, depthwise, bias[:16], stride=2, padding=1, groups=16,
                                  activation="silu", backend="triton"), x, depthwise)
    # The widths of real CNN layers pick the wider tiles (BLOCK_N 128, 64 channels a block).
    x = torch.randn(2, 128, 8, 8, dtype=bf16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(128, 128, 3, 3, dtype=bf16, requires_grad=True)
    bias = torch.randn(128, dtype=bf16, requires_grad=True)
    grad(tilesmith.ops.conv2d(x, w, bias, stride=2, padding=1, activation="relu",
                              backend="triton"), x, w, bias)
    depthwise = torch.randn(128, 1, 3, 3, dtype=bf16, requires_grad=True)
    grad(tilesmith.ops.conv2d(x, depthwise, padding=1, groups=128, backend="triton"),
         x, depthwise)
    # A shortcut added before the activation, in each forward kernel (the gemm kernel's
    # RESIDUAL_FIRST for the 1x1).
    shortcut = x.detach()
    pointwise = torch.randn(128, 128, 1, 1, dtype=bf16, requires_grad=True)
    for weight, groups in ((w, 1), (depthwise, 128), (pointwise, 1)):
        grad(tilesmith.ops.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=groups,
                                  activation="relu", residual=shortcut, backend="triton"),
             x, weight)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = torch.randn(256, 256, dtype=bf16)
        for gran, size in (("tensor", 128), ("row", 128), ("block", 128), ("block", (128, 128))):
            tilesmith.ops.quantize_fp8(x, dtype=dtype, granularity=gran, block_size=size,
                                       backend="triton")
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    qa = torch.randn(256, 256).to(e4m3)
    for kinds in (((), ()), ((256, 1), (1, 256)), ((256, 2), (2, 2))):
        tilesmith.ops.scaled_gemm(qa, qa.t(), torch.ones(kinds[0]), torch.ones(kinds[1]),
                                  backend="triton")
    tilesmith.ops.scaled_gemm(qa.to(e5m2), qa.t(), torch.ones(256, 1), torch.ones(1, 256),
                              backend="triton")
    # Float8Linear's epilogue: activation and residual, the pre-activation kept.
    scaled_gemm_with_pre(qa, qa.t(), torch.ones(256, 1), torch.ones(1, 256), None, "gelu",
                         torch.randn(256, 256, dtype=bf16), bf16, "triton", save_pre=True)
    return recorder.launches


def compile_jobs(launches):
    """(name, module, signature, constexprs, attrs, options, tuned) for each distinct
    compilation; tuned: one config of an autotune space, not a fixed launch.

    The arguments are specialised by Triton's own JIT binder, as a launch on a GPU would be:
    16-byte aligned pointers and integers divisible by 16 are marked so (that is what lets
    the compiler vectorise loads), integers equal to 1 become constants. Without that, every
    load is scalar and the register counts reported below would be meaningless."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    # The specialisation rules are the same for every NVIDIA target.
    backend = make_backend(GPUTarget("cuda", 90, 32))
    jobs, seen, all_configs_done = [], set(), set()
    for kernel, args, kwargs in launches:
        configs = [None]
        if isinstance(kernel, triton.runtime.autotuner.Autotuner):
            # Every config of an autotune space once (for the first launch of that autotuner:
            # attention has one per head-dim class); the first config for its other
            # argument types.
            configs = (kernel.configs if id(kernel) not in all_configs_done
                       else kernel.configs[:1])
            all_configs_done.add(id(kernel))
            kernel = kernel.fn
        fn = kernel
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        for config in configs:
            launch_kwargs = dict(kwargs)
            if config is not None:
                launch_kwargs.update(config.all_kwargs())
            bound, specialization, options = binder(*args, **launch_kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, launch_kwargs, bound, specialization, options)
            options = {"num_warps": options.num_warps, "num_stages": options.num_stages}
            key = (fn.__name__, tuple(signature.items()),
                   tuple((k, str(v)) for k, v in sorted(constexprs.items())),
                   tuple(sorted((k, str(v)) for k, v in attrs.items())),
                   tuple(options.items()))
            if key in seen:
                continue
            seen.add(key)
            # By name, re-imported in the worker process: JIT functions do not pickle.
            jobs.append((fn.__name__, fn.fn.__module__, signature, constexprs, attrs, options,
                         config is not None))
    return jobs


# The most shared memory one block may opt into (CUDA programming guide, per compute
# capability): a kernel that needs more cannot launch there.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _compile(job, capability):
    """(label, capability, strict, outcome): outcome is "skipped ...", "FAILED: ..." or a
    dict of the cubin's shared memory, registers and stack (spills) in bytes.

    Strict: a fixed launch (its tiles chosen by the op, not autotuned) on 16-bit or fp8
    data, which must neither spill nor overflow shared memory. An autotune config that does
    is only noted: the autotuner skips a config that cannot launch and times the rest.
    So is fp32 and fp64 work: its IEEE products run on CUDA cores, a correctness path."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    name, module, signature, constexprs, attrs, options, tuned = job
    fn = getattr(importlib.import_module(module), name)
    fn = getattr(fn, "fn", fn) if isinstance(fn, triton.runtime.autotuner.Autotuner) else fn
    pointee = next((v[1:] for v in signature.values() if v.startswith("*")), "")
    # Constexprs are keyed by argument position, as Triton's binder packs them.
    arg_names = [fn.arg_names[path[0]] for path in constexprs]
    blocks = " ".join(f"{arg.removeprefix('BLOCK_')}={value}"
                      for arg, value in zip(arg_names, constexprs.values())
                      if arg.startswith("BLOCK_"))
    label = f"{name} {pointee} {blocks} w{options['num_warps']} s{options['num_stages']}"
    strict = not tuned and pointee in ("bf16", "fp16", "fp8e4nv", "fp8e5")
    if capability < 89 and any(v.startswith("*fp8") for v in signature.values()):
        return label, capability, strict, "skipped (fp8 needs sm_89+)"
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then fails the run
        return label, capability, strict, f"FAILED: {type(exc).__name__}: {str(exc)[:600]}"
    return label, capability, strict, dict(shared=compiled.metadata.shared,
                                          **_registers_and_stack(compiled.asm["cubin"]))


def _registers_and_stack(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (where ptxas puts spilled registers) of a cubin,
    as cuobjdump reads them; empty when Triton ships no cuobjdump."""
    import re
    import subprocess
    import tempfile

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", file.name],
                                capture_output=True, text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK):(\d+)", report))
    return {key: int(usage[field]) for key, field in (("registers", "REG"), ("stack", "STACK"))
            if field in usage}


def _judge(capability, strict, outcome):
    """(line, problem): a strict launch that spills or needs more shared memory than the
    target has is a problem; any other is only noted."""
    if isinstance(outcome, str):
        return outcome, outcome if outcome.startswith("FAILED") else None
    line = (f"{outcome['shared']} B shared, {outcome.get('registers', '?')} registers, "
            f"{outcome.get('stack', '?')} B stack")
    issues = []
    if outcome.get("stack"):
        issues.append("spills registers to the stack")
    limit = SHARED_MEMORY_LIMIT.get(capability)
    if limit is not None and outcome["shared"] > limit:
        issues.append(f"needs more than sm_{capability}'s {limit} B of shared memory")
    if not issues:
        return "ok, " + line, None
    if not strict:
        return f"ok, {line} (noted: {', '.join(issues)})", None
    problem = f"FIXED LAUNCH {' and '.join(issues)}"
    return f"{problem}: {line}", problem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="80,90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    # Checked before tilesmith is imported: its kernels read the variable at import time.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_kernels.py: unset TRITON_INTERPRET (this compiles for the GPU)")
    jobs = compile_jobs(record_launches())
    targets = [int(t) for t in args.targets.split(",")]
    work = [(job, cap) for cap in targets for job in jobs]
    print(f"{len(jobs)} distinct kernel compilations x targets {targets}", flush=True)
    failures = 0
    # Processes, not threads: Triton's compiler holds the GIL for long stretches.
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for label, cap, strict, outcome in pool.map(_compile_star, work):
            line, problem = _judge(cap, strict, outcome)
            failures += problem is not None
            print(f"sm_{cap} {label:64s} {line}", flush=True)
    print(f"{len(work) - failures} compiled, {failures} failed")
    return 1 if failures else 0


def _compile_star(item):
    return _compile(*item)


if __name__ == "__main__":
    sys.exit(main())

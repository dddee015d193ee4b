"""The build: the CUDA extensions exist where they should, carry the architectures we
promise, and their kernels keep everything in registers (no local-memory spills)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tilesmith
from tilesmith import backend

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_BUILD = os.environ.get("TILESMITH_SKIP_CUDA_BUILD", "0") not in ("", "0")


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME")
    return bool(shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()
                or (home and Path(home, "bin", "nvcc").exists()))


def _cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).exists()), None)


needs_extension = pytest.mark.skipif(
    backend._C is None,
    reason=f"tilesmith._C is not built here ({backend._C_ERROR})")


def test_import_works_with_or_without_extension():
    assert tilesmith.ops.matmul is not None
    assert "torch" in tilesmith.available_backends("matmul", "cpu")


@pytest.mark.skipif(not _nvcc_present() or SKIPPED_BUILD,
                    reason="no nvcc here, or TILESMITH_SKIP_CUDA_BUILD set: pure-Python install")
def test_extensions_built_when_nvcc_is_present():
    assert backend._C is not None, backend._C_ERROR
    assert backend._C_SM90A is not None, backend._C_SM90A_ERROR


def _extension_file(module) -> str:
    return module.__file__


@needs_extension
def test_fatbin_has_sm80_sm90_sass_and_ptx():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (CUDA toolkit bin/ or triton's bundled copy)")
    so = _extension_file(backend._C)
    elves = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", so], capture_output=True, text=True).stdout
    if os.environ.get("TILESMITH_CUDA_ARCHS"):
        pytest.skip("custom TILESMITH_CUDA_ARCHS: the default architecture set is not expected")
    assert re.search(r"matmul_sm80_bf16\.sm_80\.cubin", elves), elves
    assert re.search(r"matmul_sm80_bf16\.sm_90\.cubin", elves), elves
    assert re.search(r"matmul_sm80_bf16\.sm_90\.ptx", ptx), ptx


def _resource_usage(so: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled function): {"REG": .., "STACK": .., "LOCAL": .., ...}}"""
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", so], capture_output=True,
                         text=True, check=True).stdout
    usage, arch, function = {}, None, None
    for line in out.splitlines():
        if m := re.match(r"arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            function = None
    return usage


# Kernel name -> instantiations per SASS architecture. matmul: 2 input dtypes x 2 output
# types x 2 layouts of a x 2 of b x 2 load paths; attention: 2 dtypes x 3 head dims x causal
# or not x dropout or not, for each of its three kernels, and the dK/dV kernel twice over at
# head dim 256 (a dK and a dV variant); conv2d and depthwise: 2 dtypes for each of three;
# activation backward: 2 dz dtypes x 3 (grad, pre) dtype pairs x 2 load widths.
KERNEL_INSTANCES = {"matmul_kernel": 32, "attention_fwd_kernel": 24,
                    "attention_bwd_dkdv_kernel": 32, "attention_bwd_dq_kernel": 24,
                    "conv2d_fwd_kernel": 2, "conv2d_dgrad_kernel": 2, "conv2d_wgrad_kernel": 2,
                    "depthwise_fwd_kernel": 2, "depthwise_dgrad_kernel": 2,
                    "depthwise_wgrad_kernel": 2, "activation_backward_kernel": 12}


@needs_extension
def test_sm90a_extension_has_wgmma_kernels_without_spills():
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump found (CUDA toolkit bin/ or triton's bundled copy)")
    if backend._C_SM90A is None:
        pytest.skip(f"tilesmith._C_sm90a is not built here ({backend._C_SM90A_ERROR})")
    so = _extension_file(backend._C_SM90A)
    usage = _resource_usage(so)
    found = {key: value for key, value in usage.items() if "scaled_gemm_kernel" in key[1]}
    # 2 formats of a x 2 of b x (128-wide tiles with or without per-block scaling, 256-wide
    # tiles), all sm_90a.
    assert {arch for arch, _ in found} == {"sm_90a"} and len(found) == 12, sorted(found)
    assert not [k for k, u in found.items() if u["STACK"] or u["LOCAL"]]
    sass = subprocess.run([_cuobjdump(), "-sass", so], capture_output=True, text=True).stdout
    assert "QGMMA.64x128x32.F32.E4M3.E4M3" in sass and "QGMMA.64x128x32.F32.E5M2.E4M3" in sass
    assert "QGMMA.64x256x32.F32.E4M3.E4M3" in sass and "QGMMA.64x256x32.F32.E5M2.E5M2" in sass
    # Its TMA-fed twin, as many variants, with the matmul's register split (below).
    tma = {key: value for key, value in usage.items() if "scaled_gemm_tma_kernel" in key[1]}
    assert len(tma) == 12, sorted(tma)
    assert not [k for k, u in tma.items() if u["STACK"] or u["LOCAL"]], tma
    assert {u["REG"] for u in tma.values()} == {168}, tma
    # quantize_fp8: 3 input dtypes x 2 load widths for the cast (x 2 formats) and the
    # per-tensor amax kernels; the conversion is the hardware's (F2FP to e4m3/e5m2 pairs).
    quantize = {key: value for key, value in usage.items()
                if "quantize_kernel" in key[1] or "tensor_amax_kernel" in key[1]}
    assert len(quantize) == 3 * 2 * 2 + 3 * 2, sorted(quantize)
    assert not [k for k, u in quantize.items() if u["STACK"] or u["LOCAL"]]
    assert "F2FP.SATFINITE.E4M3.F32.PACK" in sass and "F2FP.SATFINITE.E5M2.F32.PACK" in sass
    # The Hopper matmul: 2 dtypes x 2 output types x 2 tile widths x 2 layouts of a x 2 of
    # b; the transposed layouts read through wgmma's transpose bits (.tnspA / .tnspB).
    matmul = {key: value for key, value in usage.items()
              if "matmul_sm90a" in key[1] and "matmul_kernel" in key[1]}
    assert len(matmul) == 32, sorted(matmul)
    assert not [k for k, u in matmul.items() if u["STACK"] or u["LOCAL"]]
    for shape in ("64x128x16.F32.BF16", "64x256x16.F32.BF16", "64x128x16.F32 ",
                  "64x256x16.F32 "):  # the fp16 form names no input type
        assert f"HGMMA.{shape}" in sass, shape
    assert ".tnspA" in sass and ".tnspB" in sass
    # Its TMA twin (matmul_tma_sm90a.cuh), as many variants: tile loads by the TMA (UTMALDG),
    # mbarrier waits (SYNCS), registers moved from the producer warpgroup to the consumers.
    tma = {key: value for key, value in usage.items()
           if "matmul_tma_sm90a" in key[1] and "matmul_tma_kernel" in key[1]}
    assert len(tma) == 32, sorted(tma)
    assert not [k for k, u in tma.items() if u["STACK"] or u["LOCAL"]], tma
    # setmaxnreg: the consumers' 232 come from the producer's 168 - 40 (384 threads x 168 =
    # 40 x 128 + 232 x 256); launched with fewer, the consumers' claim would wait forever.
    assert {u["REG"] for u in tma.values()} == {168}, tma
    for instruction in ("UTMALDG.3D", "SYNCS.PHASECHK.TRANS64.TRYWAIT"):
        assert instruction in sass, instruction
    # The TMA-fed attention forward (attention_fwd_tma_sm90a.cuh): 2 dtypes x 2 widths x
    # causal or not, the same register split. At head dim 128 its consumers need most of
    # their 232 registers: a spill here also serialises their wgmma (ptxas C7512).
    attention = {key: value for key, value in usage.items()
                 if "attention_tma_sm90a" in key[1] and "attention_fwd_tma_kernel" in key[1]}
    assert len(attention) == 8, sorted(attention)
    assert not [k for k, u in attention.items() if u["STACK"] or u["LOCAL"]], attention
    assert {u["REG"] for u in attention.values()} == {168}, attention
    # Its consumers' turns (Turns): named barriers 1 and 2 of 256 threads, their ids
    # immediates (a register id makes ptxas reserve all 16 barriers).
    for instruction in ("BAR.SYNC.DEFER_BLOCKING 0x1, 0x100", "BAR.SYNC.DEFER_BLOCKING 0x2, 0x100",
                        "BAR.ARV 0x1, 0x100", "BAR.ARV 0x2, 0x100"):
        assert instruction in sass, instruction
    # One setmaxnreg of each kind in each of the 32 + 12 + 8 TMA kernels (matmul, FP8 and
    # attention): ptxas drops them silently where the producer's and consumers' code
    # re-converge.
    assert sass.count("USETMAXREG.DEALLOC.CTAPOOL 0x28") == 52
    assert sass.count("USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8") == 52
    # The Hopper conv2d: forward, dgrad and wgrad x 2 dtypes x 2 tile widths.
    for kernel in ("conv2d_fwd_kernel", "conv2d_dgrad_kernel", "conv2d_wgrad_kernel"):
        conv = {key: value for key, value in usage.items()
                if "conv2d_sm90a" in key[1] and kernel in key[1]}
        assert len(conv) == 4, (kernel, sorted(conv))
        assert not [k for k, u in conv.items() if u["STACK"] or u["LOCAL"]], conv
    # The Hopper attention: forward, dK/dV and dQ, each 2 dtypes x 2 widths (head dims 64
    # and 128) x causal or not x (plain, masked, dropout); P V, P^T dO, dS^T Q and dS K take A from
    # registers.
    for kernel in ("attention_sm90a::attention_fwd_kernel",
                   "attention_sm90a::attention_bwd_dkdv_kernel",
                   "attention_sm90a::attention_bwd_dq_kernel"):
        namespace, name = kernel.split("::")
        attention = {key: value for key, value in usage.items()
                     if namespace in key[1] and name in key[1]}
        assert len(attention) == 24, (kernel, sorted(attention))
        assert not [k for k, u in attention.items() if u["STACK"] or u["LOCAL"]], attention
    assert "HGMMA.64x64x16.F32.BF16" in sass
    for width in (64, 128):
        assert re.search(rf"HGMMA\.64x{width}x16\.F32\.BF16 R\d+, R\d+, gdesc\[UR\d+\]\.tnspB",
                         sass), width


@needs_extension
@pytest.mark.parametrize("kernel", list(KERNEL_INSTANCES))
def test_cuda_kernels_do_not_spill(kernel):
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump found (CUDA toolkit bin/ or triton's bundled copy)")
    usage = _resource_usage(_extension_file(backend._C))
    found = {key: value for key, value in usage.items() if kernel in key[1]}
    archs = {arch for arch, _ in found}
    assert len(found) == KERNEL_INSTANCES[kernel] * len(archs) and archs, sorted(found)
    spilling = {f"{arch} {name}": (u["STACK"], u["LOCAL"]) for (arch, name), u in found.items()
                if u["STACK"] or u["LOCAL"]}
    assert not spilling, f"kernels with stack/local memory (spills): {spilling}"


def test_kernel_files_include_no_torch_headers():
    """Kernel files see plain params structs: they compile in seconds, not minutes."""
    offenders = []
    for path in list((ROOT / "csrc").rglob("*.cu")) + list((ROOT / "csrc").rglob("*.cuh")):
        text = path.read_text()
        if re.search(r"#include\s*[<\"](torch|ATen|c10)/", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_pure_python_install_without_cuda(tmp_path):
    """TILESMITH_SKIP_CUDA_BUILD=1 installs tilesmith as pure Python (Triton and torch
    backends), and it imports and says why the cuda backend is unavailable."""
    target = tmp_path / "site"
    env = dict(os.environ, TILESMITH_SKIP_CUDA_BUILD="1")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)], env=env,
                   check=True, capture_output=True, timeout=600)
    assert not list(target.rglob("_C*.so"))
    # This checkout's editable install (a meta-path finder) would otherwise lend the target
    # its own built extension: drop it, as on a machine that only has the wheel.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in str(getattr(f, '__module__', '')).lower()]; "
            "import torch, tilesmith; b = tilesmith.backend; "
            "print(tilesmith.__file__); print(b._C is None); "
            "print(b.unavailable_reason('cuda', 'matmul', torch.device('cpu'), torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(target)),
                         capture_output=True, text=True, check=True, timeout=300).stdout
    where, no_extension, reason = out.strip().splitlines()
    assert where.startswith(str(target)) and no_extension == "True"
    assert "not built" in reason

"""tilesmith's CUDA kernels on a CPU emulator of the sm_80 instructions they use
(tests/emulation/sm80_emulator.h), against float64 references.

This checks what can go wrong in a tensor-core kernel's arithmetic of indices: fragment
layouts, swizzles, pipeline stages, tile edges, masks, epilogues, out-of-bounds copies
(cp.async and ldmatrix addresses are bounds-checked; outputs sit between NaN guard bands).
It does not replace running the same kernels on a GPU (the ``cuda`` parametrisations of
test_matmul, test_gemm, ...): the emulator implements the PTX ISA as we read it, and cannot
see register spills or speed, nor races other than those of the pipelines' stages (below).
Kernel sources are compiled with the host C++ compiler into build/emulation/, keyed by a
hash of the sources.

Every test runs twice: with cp.async copies landing at the wait that covers them (a stage
read before its copies were waited for is stale) and landing at issue (a stage refilled
while another thread, or an in-flight wgmma, may still read it is overwritten too soon):
the two extremes of when the hardware may carry a copy out. The first run gives the
threads their turns between barriers in thread order, the second in reverse, so that a
missing barrier between a write to shared memory and another thread's read of it shows
as stale data in one of the two whichever thread writes first.
TILESMITH_EMULATOR_ORDER=shuffle in the environment gives both runs a random order at
every turn instead (TILESMITH_EMULATOR_SEED picks it; sm80_emulator.h).

The emulator also meters what it can of speed (MemoryTraffic in sm80_emulator.h): the
shared-memory bank conflicts of ldmatrix and cp.async, and the global-memory sectors that
cp.async reads. No launch in any test here may have a bank conflict
(conflict_free_shared_memory), and full tiles of realistic shapes must read only whole
sectors (test_full_tiles_read_whole_sectors)."""

import ctypes
import functools
import hashlib
import itertools
import math
import os
import random
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import tilesmith
from tilesmith import testing
from tilesmith.testing import assert_close_to_reference

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "emulation"
BUILD = ROOT / "build" / "emulation"
GUARD = 64  # NaN elements before and after every output
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}  # the harnesses' dtype argument


def _cuda_include_dir() -> str | None:
    """The toolkit's include directory, as nvcc itself reports it (nvcc on our machines is a
    wrapper script, so the path cannot be guessed from where it is)."""
    if not shutil.which("nvcc"):
        return None
    dry = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    match = re.search(r'INCLUDES="-I([^"]+)"', dry.stdout + dry.stderr)
    return match.group(1).strip() if match else None


INCLUDE = _cuda_include_dir()
CXX = shutil.which(os.environ.get("CXX", "g++"))
pytestmark = pytest.mark.skipif(
    INCLUDE is None or CXX is None,
    reason="needs a host C++ compiler and the CUDA headers (nvcc) to build the emulated kernels")


@pytest.fixture(autouse=True, params=[("late", "forward"), ("early", "reverse")],
                ids=["copies_late", "copies_early_reverse"])
def copy_timing(request, monkeypatch):
    copies, order = request.param
    monkeypatch.setenv("TILESMITH_EMULATOR_COPIES", copies)  # both read at each launch
    if os.environ.get("TILESMITH_EMULATOR_ORDER") != "shuffle":
        monkeypatch.setenv("TILESMITH_EMULATOR_ORDER", order)
    return copies


LOADED: dict[str, ctypes.CDLL] = {}  # the emulated libraries built and loaded so far


@functools.cache
def emulated(name: str) -> ctypes.CDLL:
    """tests/emulation/<name>_emulated.cpp built into a shared library (cached by content)."""
    sources = ([EMULATION / f"{name}_emulated.cpp"] + sorted(EMULATION.glob("*.h"))
               + sorted((ROOT / "csrc").rglob("*.cuh")) + sorted((ROOT / "csrc").rglob("*.h")))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    library = BUILD / f"{name}-{key}.so"
    if not library.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        # -O1: compiles in seconds and runs fast enough; strict aliasing off because the
        # kernels move fragments through reinterpret_cast as CUDA code does.
        subprocess.run([CXX, "-std=c++20", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing",
                        "-I", INCLUDE, str(sources[0]), "-o", str(partial)], check=True)
        partial.rename(library)
    LOADED[name] = ctypes.CDLL(str(library))
    return LOADED[name]


class MemoryTraffic(NamedTuple):
    """sm80_emulator.h's MemoryTraffic: what the emulated launches cost in shared-memory
    wavefronts (one per phase when it has no bank conflict) and global-memory sectors."""
    ldmatrix_phases: int
    ldmatrix_wavefronts: int
    cp_async_phases: int
    cp_async_wavefronts: int
    cp_async_instructions: int
    cp_async_bytes: int
    cp_async_sectors: int
    cp_async_unmatched_lanes: int

    def assert_conflict_free(self):
        assert self.ldmatrix_wavefronts == self.ldmatrix_phases, \
            f"ldmatrix bank conflicts: {self}"
        assert self.cp_async_wavefronts == self.cp_async_phases, \
            f"cp.async shared-memory bank conflicts: {self}"
        # The meter pairs a warp's copies by their order of issue in each lane.
        assert self.cp_async_unmatched_lanes == 0, f"lanes issued different copies: {self}"


def memory_traffic() -> MemoryTraffic:
    """The counters of every emulated library loaded so far, summed; then zeroed."""
    total = [0] * len(MemoryTraffic._fields)
    for lib in LOADED.values():
        counters = (ctypes.c_uint64 * len(total))()
        lib.tilesmith_emulator_traffic(counters)
        lib.tilesmith_emulator_traffic_reset()
        total = [t + c for t, c in zip(total, counters)]
    return MemoryTraffic(*total)


@pytest.fixture(autouse=True)
def conflict_free_shared_memory():
    """Every kernel every test here launches reads and fills shared memory without bank
    conflicts. (The meter's own tests read, and so zero, the conflicts they make.)"""
    memory_traffic()
    yield
    memory_traffic().assert_conflict_free()


def guarded_empty(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled output with NaN guard bands either side: (output view, whole storage)."""
    numel = math.prod(shape)
    storage = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype)
    return storage[GUARD:GUARD + numel].view(shape), storage


def assert_guards_untouched(storage: torch.Tensor, name: str) -> None:
    for band in (storage[:GUARD], storage[-GUARD:]):
        assert band.isnan().all(), f"{name}: the kernel wrote outside the output"


def extent_bytes(t: torch.Tensor) -> int:
    """Bytes from t's first element to just past its last one."""
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()


def buffer_table(tensors):
    tensors = [t for t in tensors if t is not None]
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * len(tensors))(*[extent_bytes(t) for t in tensors])
    return ptrs, sizes, len(tensors)


# --- the emulator's turn orders -----------------------------------------------------------------

@pytest.mark.parametrize("gather", [False, True], ids=["broadcast", "gather"])
def test_turn_orders_expose_a_missing_barrier(gather, monkeypatch):
    """One thread's write read by all (broadcast), or all threads' writes read by one
    (gather), without the barrier between: stale in one of the two orders, which of them
    depending on which thread writes; with it, right in every order."""
    lib = emulated("turn_order")
    right = [7] * 64 if not gather else [sum(range(64))]
    stale_in = "forward" if gather else "reverse"
    for order in ("forward", "reverse", "shuffle"):
        monkeypatch.setenv("TILESMITH_EMULATOR_ORDER", order)
        for barrier in (True, False):
            out = (ctypes.c_int * 64)()
            error = ctypes.create_string_buffer(256)
            assert lib.emulate_turn_order(int(gather), int(barrier), out, error, 256) == 0, \
                error.value.decode()
            got = list(out)[:len(right)]
            if barrier or order not in (stale_in, "shuffle"):
                assert got == right, (order, barrier)
            elif order == stale_in:
                assert got != right, (order, barrier)


# --- the emulator's memory-traffic meter -------------------------------------------------------

LDMATRIX_PATTERNS = {
    # name: (row pitch in bytes, swizzled, wavefronts for the four 8-row phases)
    "rows_128_bytes_apart": (128, False, 32),  # one bank quad per phase: 8-way conflicts
    "swizzled": (128, True, 4),
    "rows_padded_to_144_bytes": (144, False, 4),
    "rows_64_bytes_apart": (64, False, 16),  # two quads per phase: 4-way
    "one_row_per_phase": (0, False, 4),  # 8 lanes, one address: a broadcast
}


@pytest.mark.parametrize("pattern", list(LDMATRIX_PATTERNS))
def test_meter_counts_ldmatrix_bank_conflicts(pattern):
    pitch, swizzle, wavefronts = LDMATRIX_PATTERNS[pattern]
    error = ctypes.create_string_buffer(256)
    assert emulated("memory_traffic").emulate_ldmatrix_pattern(pitch, int(swizzle), error,
                                                               256) == 0, error.value.decode()
    traffic = memory_traffic()
    assert (traffic.ldmatrix_phases, traffic.ldmatrix_wavefronts) == (4, wavefronts)


CP_ASYNC_PATTERNS = {
    # name: ((bytes between lanes in shared memory, bytes between lanes in global memory,
    #         global offset, lanes that issue one more copy),
    #        (wavefronts of the 4 phases, sectors for the 512 bytes, unmatched lanes))
    "contiguous": ((16, 16, 0, 0), (4, 16, 0)),
    "shared_128_bytes_apart": ((128, 16, 0, 0), (32, 16, 0)),  # each phase in one bank quad
    "global_32_bytes_apart": ((16, 32, 0, 0), (4, 32, 0)),  # half of every sector unused
    "global_off_a_sector_boundary": ((16, 16, 16, 0), (4, 17, 0)),
    "half_the_lanes_copy_more": ((16, 16, 0, 16), (4, 16, 16)),
}


@pytest.mark.parametrize("pattern", list(CP_ASYNC_PATTERNS))
def test_meter_counts_cp_async_conflicts_and_sectors(pattern):
    arguments, (wavefronts, sectors, unmatched) = CP_ASYNC_PATTERNS[pattern]
    error = ctypes.create_string_buffer(256)
    assert emulated("memory_traffic").emulate_cp_async_pattern(*arguments, error, 256) == 0, \
        error.value.decode()
    assert memory_traffic() == MemoryTraffic(
        ldmatrix_phases=0, ldmatrix_wavefronts=0, cp_async_phases=4,
        cp_async_wavefronts=wavefronts, cp_async_instructions=1, cp_async_bytes=512,
        cp_async_sectors=sectors, cp_async_unmatched_lanes=unmatched)


WGMMA_FENCES = ["both", "no_proxy_fence", "proxy_fence_before_stores", "no_wgmma_fence"]


@pytest.mark.parametrize("fences", WGMMA_FENCES)
def test_wgmma_without_its_fences_fails(fences):
    """wgmma reads shared memory through the async proxy: operands stored by threads reach
    it only after their fence.proxy.async; and a wgmma.fence must precede the first wgmma.
    On a GPU a missing fence gives wrong results at the hardware's whim; the emulator fails
    such a launch every time."""
    lib = emulated("wgmma_fences")
    out, expected = (ctypes.c_float * 4096)(), (ctypes.c_float * 4096)()
    error = ctypes.create_string_buffer(256)
    status = lib.emulate_wgmma_fences(WGMMA_FENCES.index(fences), out, expected, error, 256)
    message = error.value.decode()
    if fences == "both":
        assert status == 0, message
        assert list(out) == list(expected)
        assert any(list(expected))
    elif fences == "no_wgmma_fence":
        assert status == 1
        assert "without a wgmma.fence" in message
    else:
        assert status == 1
        assert "after the last fence.proxy.async" in message


MBARRIER_PUBLICATIONS = ["published", "no_fence", "no_syncthreads"]


@pytest.mark.parametrize("publication", MBARRIER_PUBLICATIONS)
def test_mbarrier_used_before_its_init_is_published_fails(publication):
    """An mbarrier.init reaches the TMA only through a fence.mbarrier_init, and the other
    threads only through a __syncthreads after it. On a GPU either missing may hang or count
    on a stale barrier at the hardware's whim; the emulator fails such a launch every time
    (in reverse order a waiting thread comes before the init itself)."""
    lib = emulated("mbarrier_init")
    source = (ctypes.c_uint16 * 4096)(*[(7 * i + 3) % 65521 for i in range(4096)])
    out = (ctypes.c_uint16 * 4096)()
    error = ctypes.create_string_buffer(256)
    status = lib.emulate_mbarrier_init(MBARRIER_PUBLICATIONS.index(publication), source, out,
                                       error, 256)
    message = error.value.decode()
    if publication == "published":
        assert status == 0, message
        assert list(out) == list(source)
    elif publication == "no_fence":
        assert status == 1
        assert "has not fenced it (fence.mbarrier_init)" in message
    else:
        assert status == 1
        assert "mbarrier used before" in message
        if os.environ["TILESMITH_EMULATOR_ORDER"] == "forward":
            assert "before a __syncthreads published" in message


# --- matmul / gemm: csrc/matmul/matmul_sm80.cuh ------------------------------------------------

class MatmulParams(ctypes.Structure):
    """csrc/matmul/matmul.h's MatmulParams (its size is checked against the C++ one). ctypes
    zero-fills what is not given, alpha included: pass alpha=1.0."""
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("c", ctypes.c_void_p),
                ("batch", ctypes.c_int64), ("m", ctypes.c_int64), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64),
                ("a_batch_stride", ctypes.c_int64), ("a_row_stride", ctypes.c_int64),
                ("a_col_stride", ctypes.c_int64),
                ("b_batch_stride", ctypes.c_int64), ("b_row_stride", ctypes.c_int64),
                ("b_col_stride", ctypes.c_int64),
                ("c_batch_stride", ctypes.c_int64), ("c_row_stride", ctypes.c_int64),
                ("alpha", ctypes.c_float), ("bias", ctypes.c_void_p),
                ("residual", ctypes.c_void_p), ("residual_batch_stride", ctypes.c_int64),
                ("residual_row_stride", ctypes.c_int64),
                ("pre", ctypes.c_void_p), ("pre_batch_stride", ctypes.c_int64),
                ("pre_row_stride", ctypes.c_int64),
                ("activation", ctypes.c_int), ("out_fp32", ctypes.c_bool),
                ("residual_before_activation", ctypes.c_bool)]


ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "relu6": 5,
               "hardswish": 6, "sigmoid": 7, "hardsigmoid": 8}


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return getattr(torch.nn.functional, activation)(x)


def vector_loadable(t: torch.Tensor, contiguous_dim: int) -> bool:
    """matmul_sm80.cuh's vector_loadable: 16-byte cp.async can read t's rows."""
    other = 3 - contiguous_dim
    return (t.stride(contiguous_dim) == 1 and t.stride(other) % 8 == 0
            and (t.shape[0] == 1 or t.stride(0) % 8 == 0) and t.data_ptr() % 16 == 0)


def run_matmul(a, b, *, vector_loads=None, out_fp32=False, alpha=1.0, bias=None,
               residual=None, activation=None, want_pre=False, hopper=False, tma_blocks=None):
    """The emulated kernel on 3-D a (batch, m, k) and b (batch or 1, k, n): (c, pre).
    hopper: matmul_sm90a.cuh's wgmma kernels, else matmul_sm80.cuh's (where vector_loads=None
    picks the load path as the launcher does); with tma_blocks, matmul_tma_sm90a.cuh's on that
    many persistent blocks. Returns None for c when the wgmma kernels do not take the
    operands."""
    lib = emulated("matmul")
    assert lib.matmul_params_size() == ctypes.sizeof(MatmulParams)
    batch, m, k = a.shape
    n = b.shape[2]
    out_dtype = torch.float32 if out_fp32 else a.dtype
    c, c_storage = guarded_empty((batch, m, n), out_dtype)
    pre, pre_storage = guarded_empty((batch, m, n), out_dtype) if want_pre else (None, None)
    p = MatmulParams(a=a.data_ptr(), b=b.data_ptr(), c=c.data_ptr(), batch=batch, m=m, n=n, k=k,
                     a_batch_stride=a.stride(0), a_row_stride=a.stride(1),
                     a_col_stride=a.stride(2),
                     b_batch_stride=b.stride(0) if b.shape[0] > 1 else 0,
                     b_row_stride=b.stride(1), b_col_stride=b.stride(2),
                     c_batch_stride=m * n, c_row_stride=n, alpha=alpha,
                     activation=ACTIVATIONS[activation], out_fp32=out_fp32)
    if bias is not None:
        p.bias = bias.data_ptr()
    if residual is not None:
        p.residual = residual.data_ptr()
        p.residual_batch_stride, p.residual_row_stride = residual.stride(0), residual.stride(1)
    if pre is not None:
        p.pre, p.pre_batch_stride, p.pre_row_stride = pre.data_ptr(), m * n, n
    ptrs, sizes, count = buffer_table([a, b])
    error = ctypes.create_string_buffer(512)
    if hopper and tma_blocks is not None:
        status = emulated("matmul_sm90a").emulate_matmul_tma_sm90a(
            ctypes.byref(p), DTYPE_CODES[a.dtype], tma_blocks, ptrs, sizes, count, error,
            len(error))
    elif hopper:
        status = emulated("matmul_sm90a").emulate_matmul_sm90a(
            ctypes.byref(p), DTYPE_CODES[a.dtype], ptrs, sizes, count, error, len(error))
    if hopper and status == 2:
        return None, None
    if not hopper:
        status = run_matmul_sm80(lib, p, a, b, vector_loads, ptrs, sizes, count, error)
    assert status == 0, error.value.decode()
    assert_guards_untouched(c_storage, "c")
    if pre is not None:
        assert_guards_untouched(pre_storage, "pre")
    return c, pre


def run_matmul_sm80(lib, p, a, b, vector_loads, ptrs, sizes, count, error):
    # The kernel's template choice, as csrc/matmul/matmul_sm80.cuh's run() makes it.
    a_k_contiguous = a.stride(2) == 1 or (a.stride(1) != 1 and a.stride(2) <= a.stride(1))
    b_n_contiguous = b.stride(2) == 1 or (b.stride(1) != 1 and b.stride(2) <= b.stride(1))
    loadable = (vector_loadable(a, 2 if a_k_contiguous else 1)
                and vector_loadable(b, 2 if b_n_contiguous else 1))
    if vector_loads is None:
        vector_loads = loadable
    assert loadable or not vector_loads, "test error: cp.async cannot read these operands"
    return lib.emulate_matmul(ctypes.byref(p), DTYPE_CODES[a.dtype], int(a_k_contiguous),
                              int(b_n_contiguous), int(vector_loads), ptrs, sizes, count, error,
                              len(error))


def matmul_operand(rows, cols, dtype, contiguous_dim, *, batch=1, misalign=False, pad=False):
    """A (batch, rows, cols) operand whose unit stride runs along `contiguous_dim` (1 or 2),
    optionally one element off 16-byte alignment (so only the element-wise loads can read it),
    or with its rows padded to a multiple of 8 elements (NaN padding: a kernel that reads
    past the row's end makes NaNs)."""
    shape = (batch, rows, cols) if contiguous_dim == 2 else (batch, cols, rows)
    if pad:
        padded = (*shape[:2], -(-shape[2] // 8) * 8)
        storage = torch.full(padded, float("nan"), dtype=dtype)
        storage[..., :shape[2]] = torch.randn(shape).to(dtype)
        t = storage[..., :shape[2]]
    else:
        storage = torch.randn(math.prod(shape) + 1, dtype=torch.float32).to(dtype)
        base = storage[1:] if misalign else storage[:-1]
        t = base.view(shape)
    return t if contiguous_dim == 2 else t.transpose(1, 2)


def reference_and_baseline(a, b, alpha=1.0, bias=None, residual=None, activation=None,
                           out_dtype=None):
    """(float64 result and pre-activation, the same two with fp32 accumulation rounded to
    out_dtype, which is also the pre-activation's)."""
    results = []
    for dt in (torch.float64, torch.float32):
        x = alpha * (a.to(dt) @ b.to(dt))
        if bias is not None:
            x = x + bias.to(dt)
        pre = x
        x = activate(x, activation)
        if residual is not None:
            x = x + residual.to(dt)
        results.append((x, pre))
    (ref, ref_pre), (base, base_pre) = results
    return ref, ref_pre, base.to(out_dtype), base_pre.to(out_dtype)


LAYOUTS = [(2, 2), (2, 1), (1, 2), (1, 1)]  # contiguous dim of a, of b


@pytest.mark.parametrize("out_fp32", [False, True], ids=["out-same", "out-fp32"])
@pytest.mark.parametrize("vector_loads", [True, False], ids=["cp.async", "scalar"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["a_rm-b_rm", "a_rm-b_cm", "a_cm-b_rm",
                                                 "a_cm-b_cm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matmul_kernel_every_variant(dtype, layout, vector_loads, out_fp32):
    # Two block rows, a partial block column, four K tiles (more than the three stages, so
    # stages are refilled; the last tile partial).
    m, n, k = 136, 72, 216
    a = matmul_operand(m, k, dtype, layout[0])
    b = matmul_operand(k, n, dtype, layout[1])
    c, _ = run_matmul(a, b, vector_loads=vector_loads, out_fp32=out_fp32)
    out_dtype = torch.float32 if out_fp32 else dtype
    ref, _, base, _ = reference_and_baseline(a, b, out_dtype=out_dtype)
    assert_close_to_reference(c, ref, base)


def test_matmul_kernel_unaligned_odd_shapes_and_batch():
    # Odd sizes, a misaligned a, b broadcast over the batch (batch stride 0): scalar loads.
    a = matmul_operand(33, 23, torch.bfloat16, 2, batch=3, misalign=True)
    b = matmul_operand(23, 17, torch.bfloat16, 1)
    c, _ = run_matmul(a, b, vector_loads=False)
    ref, _, base, _ = reference_and_baseline(a, b, out_dtype=torch.bfloat16)
    assert_close_to_reference(c, ref, base)


def test_matmul_kernel_grouped_block_order():
    # 9 x 2 output tiles: the grouped ordering's last group has a single block row.
    a = matmul_operand(1100, 16, torch.float16, 2)
    b = matmul_operand(16, 140, torch.float16, 2)
    c, _ = run_matmul(a, b)
    ref, _, base, _ = reference_and_baseline(a, b, out_dtype=torch.float16)
    assert_close_to_reference(c, ref, base)


def test_matmul_kernel_k_zero_gives_zeros():
    a = matmul_operand(20, 0, torch.bfloat16, 2)
    b = matmul_operand(0, 12, torch.bfloat16, 2)
    c, _ = run_matmul(a, b)
    assert (c == 0).all()


@pytest.mark.parametrize("out_fp32", [False, True], ids=["out-same", "out-fp32"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS), ids=str)
def test_gemm_epilogue(activation, out_fp32):
    dtype = torch.bfloat16
    m, n, k = 72, 136, 40
    a = matmul_operand(m, k, dtype, 2, batch=2)
    b = matmul_operand(k, n, dtype, 1)
    bias = torch.randn(n, dtype=torch.float32)
    out_dtype = torch.float32 if out_fp32 else dtype
    residual = torch.randn(2, m, n + 8, dtype=out_dtype)[:, :, :n]  # a row stride != n
    c, pre = run_matmul(a, b, out_fp32=out_fp32, alpha=0.75, bias=bias, residual=residual,
                        activation=activation, want_pre=True)
    ref, ref_pre, base, base_pre = reference_and_baseline(
        a, b, 0.75, bias, residual, activation, out_dtype)
    assert_close_to_reference(c, ref, base)
    assert_close_to_reference(pre, ref_pre, base_pre, name="pre-activation")


@pytest.mark.parametrize("hopper", [False, True], ids=["sm80", "sm90a"])
def test_gemm_epilogue_relu_keeps_a_nan(hopper):
    """epilogue.cuh's relu keeps a NaN, as torch.relu does (fmaxf, which it took, gives 0):
    a's NaN row is a NaN row of c, and of the pre-activation."""
    a = matmul_operand(72, 40, torch.bfloat16, 2)
    b = matmul_operand(40, 136, torch.bfloat16, 1)
    a[0, 9] = float("nan")
    c, pre = run_matmul(a, b, activation="relu", want_pre=True, hopper=hopper)
    ref, ref_pre, base, base_pre = reference_and_baseline(a, b, activation="relu",
                                                          out_dtype=torch.bfloat16)
    assert ref[0, 9].isnan().all() and ref.isnan().sum() == 136
    assert torch.equal(c.isnan(), ref.isnan()) and torch.equal(pre.isnan(), ref.isnan())
    rows = [r for r in range(72) if r != 9]
    assert_close_to_reference(c[:, rows], ref[:, rows], base[:, rows])


# --- matmul / gemm on wgmma: csrc/matmul/matmul_sm90a.cuh (cp.async) and matmul_tma_sm90a.cuh
# (TMA, warp-specialized, persistent; tma_blocks: its blocks, fewer than the tiles so that a
# block walks several and its stage ring wraps across them) ----------------------------------

HOPPER_MATMUL_KERNELS = {"cp_async": None, "tma": 1, "tma_3_blocks": 3}


@pytest.mark.parametrize("kernel", list(HOPPER_MATMUL_KERNELS))
@pytest.mark.parametrize("out_fp32", [False, True], ids=["out-same", "out-fp32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["a_rm-b_rm", "a_rm-b_cm", "a_cm-b_rm",
                                                 "a_cm-b_cm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hopper_matmul_kernel_every_layout(dtype, layout, out_fp32, kernel):
    # Two block rows (the second 8 rows deep), a partial 128-wide block column, seven K tiles
    # (more than the five cp.async stages, so stages are refilled; the TMA kernel's seven
    # wrap on the second tile) of which the last holds 60 of 64 and ends inside a 16-byte
    # piece: rows padded to 8 elements with NaN.
    m, n, k = 136, 72, 444
    lib = emulated("matmul_sm90a")
    assert lib.matmul_sm90a_tile_width(ctypes.c_int64(n)) == 128
    a = matmul_operand(m, k, dtype, layout[0], pad=True)
    b = matmul_operand(k, n, dtype, layout[1], pad=True)
    c, _ = run_matmul(a, b, out_fp32=out_fp32, hopper=True,
                      tma_blocks=HOPPER_MATMUL_KERNELS[kernel])
    out_dtype = torch.float32 if out_fp32 else dtype
    ref, _, base, _ = reference_and_baseline(a, b, out_dtype=out_dtype)
    assert_close_to_reference(c, ref, base)


@pytest.mark.parametrize("kernel", list(HOPPER_MATMUL_KERNELS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["a_rm-b_rm", "a_rm-b_cm", "a_cm-b_rm",
                                                 "a_cm-b_cm"])
def test_hopper_matmul_kernel_256_wide_tiles(layout, kernel):
    # n = 264: one full 256-wide block column (four 64-wide column blocks of b in the N-major
    # layout) and one of 8 columns; five K tiles through four stages.
    m, n, k = 72, 264, 320
    assert emulated("matmul_sm90a").matmul_sm90a_tile_width(ctypes.c_int64(n)) == 256
    a = matmul_operand(m, k, torch.bfloat16, layout[0])
    b = matmul_operand(k, n, torch.bfloat16, layout[1])
    c, _ = run_matmul(a, b, hopper=True, tma_blocks=HOPPER_MATMUL_KERNELS[kernel])
    ref, _, base, _ = reference_and_baseline(a, b, out_dtype=torch.bfloat16)
    assert_close_to_reference(c, ref, base)


@pytest.mark.parametrize("kernel", list(HOPPER_MATMUL_KERNELS))
@pytest.mark.parametrize("activation,out_fp32", [(act, False) for act in ACTIVATIONS]
                         + [("silu", True)], ids=str)
def test_hopper_gemm_epilogue_and_batch(activation, out_fp32, kernel):
    # A batch of 2 with b broadcast over it (batch stride 0), the whole fused epilogue.
    dtype = torch.float16
    out_dtype = torch.float32 if out_fp32 else dtype
    m, n, k = 72, 136, 40
    a = matmul_operand(m, k, dtype, 2, batch=2)
    b = matmul_operand(k, n, dtype, 2)
    bias = torch.randn(n, dtype=torch.float32)
    residual = torch.randn(2, m, n + 8, dtype=out_dtype)[:, :, :n]  # a row stride != n
    c, pre = run_matmul(a, b, out_fp32=out_fp32, alpha=0.75, bias=bias, residual=residual,
                        activation=activation, want_pre=True, hopper=True,
                        tma_blocks=HOPPER_MATMUL_KERNELS[kernel])
    ref, ref_pre, base, base_pre = reference_and_baseline(
        a, b, 0.75, bias, residual, activation, out_dtype)
    assert_close_to_reference(c, ref, base)
    assert_close_to_reference(pre, ref_pre, base_pre, name="pre-activation")


def test_hopper_matmul_leaves_what_cp_async_cannot_read_to_the_sm80_kernel():
    aligned = matmul_operand(24, 16, torch.bfloat16, 2)
    b = matmul_operand(16, 24, torch.bfloat16, 2)
    assert run_matmul(aligned, b, hopper=True)[0] is not None
    misaligned = matmul_operand(24, 16, torch.bfloat16, 2, misalign=True)
    assert run_matmul(misaligned, b, hopper=True)[0] is None
    odd_rows = matmul_operand(24, 17, torch.bfloat16, 2)  # row stride 17
    assert run_matmul(odd_rows, matmul_operand(17, 24, torch.bfloat16, 2), hopper=True)[0] is None


def test_hopper_matmul_k_zero_gives_the_epilogue_of_zeros():
    a = torch.zeros(1, 20, 8, dtype=torch.bfloat16)[..., :0]  # row stride 8: loadable
    b = torch.zeros(1, 8, 16, dtype=torch.bfloat16)[:, :0]
    bias = torch.randn(16, dtype=torch.float32)
    c, _ = run_matmul(a, b, bias=bias, hopper=True)
    assert torch.equal(c[0], bias.to(torch.bfloat16).expand(20, 16))


# --- attention: csrc/attention/attention_{fwd,bwd}_sm80.cuh ------------------------------------

class AttentionStrides(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("head", ctypes.c_int64), ("seq", ctypes.c_int64)]


class MaskStrides(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("head", ctypes.c_int64), ("row", ctypes.c_int64),
                ("key", ctypes.c_int64)]


class AttentionParams(ctypes.Structure):
    """csrc/attention/attention.h's AttentionParams (size checked against the C++ one)."""
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p),
                ("q_strides", AttentionStrides), ("k_strides", AttentionStrides),
                ("v_strides", AttentionStrides), ("out_strides", AttentionStrides),
                ("lse_batch_stride", ctypes.c_int64), ("lse_head_stride", ctypes.c_int64),
                ("batch", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("heads_kv", ctypes.c_int64), ("seqlen_q", ctypes.c_int64),
                ("seqlen_k", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("cu_seqlens_q", ctypes.c_void_p),
                ("cu_seqlens_k", ctypes.c_void_p), ("tokens_q", ctypes.c_int64),
                ("tokens_k", ctypes.c_int64), ("scale_log2", ctypes.c_float),
                ("scale", ctypes.c_float),
                ("mask", ctypes.c_void_p), ("mask_kind", ctypes.c_int),
                ("mask_strides", MaskStrides), ("dmask", ctypes.c_void_p),
                ("dmask_strides", MaskStrides), ("dropout_seed", ctypes.c_void_p),
                ("dropout_threshold", ctypes.c_uint32), ("dropout_scale", ctypes.c_float),
                ("keys_per_split", ctypes.c_int64), ("o_partial", ctypes.c_void_p),
                ("lse_partial", ctypes.c_void_p), ("grad_out", ctypes.c_void_p),
                ("delta", ctypes.c_void_p),
                ("dq", ctypes.c_void_p), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
                ("grad_out_strides", AttentionStrides), ("dq_strides", AttentionStrides),
                ("dk_strides", AttentionStrides), ("dv_strides", AttentionStrides)]


def strides_of(t: torch.Tensor) -> AttentionStrides:
    assert t.stride(3) == 1
    return AttentionStrides(t.stride(0), t.stride(1), t.stride(2))


def attention_params(q, k, v, scale):
    """Dense (batch, heads, seq, dim) tensors; lse and delta (batch, heads, seq_q)."""
    return AttentionParams(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                           q_strides=strides_of(q), k_strides=strides_of(k),
                           v_strides=strides_of(v), lse_batch_stride=q.shape[1] * q.shape[2],
                           lse_head_stride=q.shape[2], batch=q.shape[0], heads=q.shape[1],
                           heads_kv=k.shape[1], seqlen_q=q.shape[2], seqlen_k=k.shape[2],
                           head_dim=q.shape[3], scale_log2=scale * math.log2(math.e), scale=scale)


def broadcast_strides(t):
    """MaskStrides of a 4-D mask view: 0 along the dimensions it broadcasts (size 1)."""
    return MaskStrides(*(0 if t.shape[i] == 1 else t.stride(i) for i in range(4)))


def set_mask(p, mask):
    if mask is not None:
        p.mask = mask.data_ptr()
        # MaskKind (csrc/attention/attention.h): bool, additive in q's dtype, additive fp32.
        p.mask_kind = {torch.bool: 1, torch.float32: 3}.get(mask.dtype, 2)
        p.mask_strides = broadcast_strides(mask)


def set_dropout(p, dropout):
    """dropout: None, or (seed, dropout_p) with seed a 1-element int64 tensor."""
    if dropout is not None:
        seed, dropout_p = dropout
        p.dropout_seed = seed.data_ptr()
        p.dropout_threshold = min(round(dropout_p * 2**32), 2**32 - 1)
        p.dropout_scale = 1.0 / (1.0 - dropout_p)


def set_split(p, keys_per_split, rows, head_dim):
    """Split the forward over the keys, keys_per_split at a time, into guarded fp32 partials
    for `rows` lse rows: returns their storages (empty without a split) to check later."""
    splits = -(-p.seqlen_k // keys_per_split) if keys_per_split else 1
    if splits == 1:
        return []
    o_partial, o_storage = guarded_empty((splits, rows, head_dim), torch.float32)
    lse_partial, lse_storage = guarded_empty((splits, rows), torch.float32)
    p.keys_per_split = keys_per_split
    p.o_partial, p.lse_partial = o_partial.data_ptr(), lse_partial.data_ptr()
    return [o_storage, lse_storage]


def assert_partials_written(storages):
    """Every row of set_split's partials written (every lse row has a block in each split),
    and nothing around them."""
    for storage in storages:
        assert_guards_untouched(storage, "partials")
        assert not storage[GUARD:-GUARD].isnan().any(), "a split left partials unwritten"


def run_attention_fwd(q, k, v, causal, scale, mask=None, dropout=None, hopper=False,
                      keys_per_split=0):
    """(out, lse) of the forward kernel: attention_fwd_sm90a.cuh's (wgmma) with hopper True,
    attention_fwd_tma_sm90a.cuh's with hopper "tma", and None where it does not take the
    call; else attention_fwd_sm80.cuh's, split over the keys with keys_per_split."""
    lib = emulated("attention")
    assert lib.attention_params_size() == ctypes.sizeof(AttentionParams)
    b, h, sq, d = q.shape
    out, out_storage = guarded_empty((b, h, sq, d), q.dtype)
    lse, lse_storage = guarded_empty((b, h, sq), torch.float32)
    p = attention_params(q, k, v, scale)
    p.out, p.out_strides, p.lse = out.data_ptr(), strides_of(out), lse.data_ptr()
    set_mask(p, mask)
    set_dropout(p, dropout)
    partials = set_split(p, keys_per_split, b * h * sq, d)
    ptrs, sizes, count = buffer_table([q, k, v])
    error = ctypes.create_string_buffer(512)
    if hopper == "tma":
        status = emulated("attention_sm90a").emulate_attention_fwd_tma(
            ctypes.byref(p), DTYPE_CODES[q.dtype], int(causal), ptrs, sizes, count, error,
            len(error))
    else:
        entry = emulated("attention_sm90a").emulate_attention_sm90a if hopper else \
            lib.emulate_attention
        status = entry(ctypes.byref(p), DTYPE_CODES[q.dtype], int(causal), 0, ptrs, sizes,
                       count, error, len(error))
    if status == 2:
        return None
    assert status == 0, error.value.decode()
    assert_guards_untouched(out_storage, "out")
    assert_guards_untouched(lse_storage, "lse")
    assert_partials_written(partials)
    return out, lse


def attention_reference(q, k, v, causal, scale, dtype=torch.float64, mask=None, keep=None,
                        dropout_p=0.0):
    """(out, lse) of softmax(q k^T * scale [+ mask]) v with top-left causal masking, in
    ``dtype``; a bool mask keeps its True positions; with ``keep`` (dropout), the
    probabilities it drops are zeroed and the rest scaled by 1 / (1 - dropout_p)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        below = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~below, float("-inf"))
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.to(dtype))
    # A row with no visible key gives zeros and lse -inf (as PyTorch's SDPA), computed without
    # a NaN anywhere so that autograd's gradients stay finite too.
    visible = torch.isfinite(scores).any(-1, keepdim=True)
    scores = torch.where(visible, scores, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * visible
    if keep is not None:
        probs = probs * keep / (1 - dropout_p)
    return probs @ v, torch.where(visible, lse, float("-inf"))[..., 0]


def attention_inputs(b, h, h_kv, sq, sk, d, dtype, *, seq_major=False):
    """q, k, v; with seq_major, (batch, seq, heads, dim) projections viewed as (b, h, s, d)."""
    def make(heads, seq):
        if seq_major:
            return torch.randn(b, seq, heads, d).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, seq, d).to(dtype)
    return make(h, sq), make(h_kv, sk), make(h_kv, sk)


ATTENTION_CASES = {
    # name: (batch, heads, kv heads, seq_q, seq_k, head dim, causal, seq-major views)
    "d64_edges": (2, 2, 2, 70, 90, 64, False, False),
    "d64_causal": (1, 2, 2, 130, 130, 64, True, False),
    "d64_causal_sq_gt_sk": (1, 1, 1, 100, 40, 64, True, False),
    "d64_causal_sq_lt_sk": (1, 1, 1, 40, 100, 64, True, False),
    "d128_gqa_views": (1, 4, 2, 65, 129, 128, False, True),
    "d128_causal": (1, 1, 1, 77, 77, 128, True, False),
    "len1": (1, 1, 1, 1, 1, 64, False, False),
    # Head dims below a kernel's run zero-padded in it (64 or 128 wide).
    "d40_in_d64_gqa_causal": (2, 2, 1, 70, 90, 40, True, False),
    "d8_in_d64": (1, 1, 1, 33, 20, 8, False, False),
    "d80_in_d128_views": (1, 2, 2, 65, 100, 80, False, True),
    "d96_in_d128_causal": (1, 1, 1, 50, 50, 96, True, False),
    # Head dim 256: 32 keys per forward step with Q read from shared memory, 16 per dQ step,
    # and dK and dV in separate launches; 256-wide rows take 4 swizzle rows per copy pass.
    "d256_edges": (2, 1, 1, 65, 129, 256, False, False),
    "d256_gqa_views_causal": (1, 4, 2, 70, 100, 256, True, True),
    "d160_in_d256_causal_sq_gt_sk": (1, 2, 1, 50, 40, 160, True, False),
}


def check_attention_forward_kernel(case, dtype, hopper):
    b, h, hk, sq, sk, d, causal, seq_major = case
    q, k, v = attention_inputs(b, h, hk, sq, sk, d, dtype, seq_major=seq_major)
    scale = d ** -0.5
    out, lse = run_attention_fwd(q, k, v, causal, scale, hopper=hopper)
    ref, ref_lse = attention_reference(q, k, v, causal, scale)
    base = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=scale, enable_gqa=h != hk)
    assert_close_to_reference(out, ref, base)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_forward_kernel(case, dtype):
    check_attention_forward_kernel(ATTENTION_CASES[case], dtype, hopper=False)


# The wgmma kernels (attention_fwd_sm90a.cuh, attention_bwd_sm90a.cuh), head dims up to 128
# in kernels 64 or 128 wide: the forward takes 128 query rows per block in two warpgroups
# and 128 keys a step.
HOPPER_ATTENTION_CASES = {
    "d128_gqa_views": (1, 4, 2, 65, 129, 128, False, True),
    "d128_causal": (1, 1, 1, 77, 77, 128, True, False),
    "d80_in_d128_views": (1, 2, 2, 65, 100, 80, False, True),
    "d96_in_d128_causal": (1, 1, 1, 50, 50, 96, True, False),
    # Several query blocks and key blocks: the causal diagonal crosses a warpgroup's rows.
    "d128_causal_300": (1, 1, 1, 300, 300, 128, True, False),
    "d128_causal_sq_gt_sk": (1, 2, 1, 200, 70, 128, True, False),
    "d128_causal_sq_lt_sk": (1, 1, 1, 70, 260, 128, True, False),
    "d72_edges_batch2": (2, 1, 1, 130, 257, 72, False, False),
    "d64_causal_gqa_sq_gt_sk": (1, 4, 2, 200, 70, 64, True, False),
    "d40_in_d64_views": (1, 2, 2, 65, 129, 40, False, True),
    # More key blocks than the forward has stages: the rings of stages wrap.
    "d64_long_keys": (1, 1, 1, 64, 700, 64, False, False),
    "d128_gqa_long_keys": (1, 2, 1, 40, 650, 128, False, False),
    # (batch, seq, heads, dim) views with several batch entries: the TMA's rank-4 maps.
    "d64_views_batch2_causal_gqa": (2, 4, 2, 70, 150, 64, True, True),
}


@pytest.mark.parametrize("kernel", [True, "tma"], ids=["cp_async", "tma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(HOPPER_ATTENTION_CASES))
def test_hopper_attention_forward_kernel(case, dtype, kernel):
    check_attention_forward_kernel(HOPPER_ATTENTION_CASES[case], dtype, hopper=kernel)


def test_hopper_attention_no_keys():
    q, k, v = attention_inputs(1, 2, 2, 20, 0, 128, torch.bfloat16)
    out, lse = run_attention_fwd(q, k, v, False, 0.125, hopper=True)
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = run_attention_bwd(torch.randn(out.shape).to(q.dtype), q, k, v, out, lse, False,
                                   0.125, hopper=True)
    assert (dq == 0).all() and dk.numel() == dv.numel() == 0


def test_hopper_attention_forward_leaves_the_rest_to_the_sm80_kernel():
    """Head dims of the 256-wide kernel, and a mask with dropout, stay on mma.sync; a mask
    or dropout alone is taken."""
    def taken(d, **kwargs):
        q, k, v = attention_inputs(1, 1, 1, 8, 8, d, torch.bfloat16)
        return run_attention_fwd(q, k, v, False, 0.1, hopper=True, **kwargs) is not None

    assert taken(8) and taken(64) and taken(72) and taken(128)
    assert not taken(136)
    mask, dropout = torch.ones(1, 1, 8, 8, dtype=torch.bool), (torch.tensor([7]), 0.1)
    assert taken(128, mask=mask) and taken(128, dropout=dropout)
    assert not taken(128, mask=mask, dropout=dropout)


def test_attention_d256_shared_memory_matches_the_python_routing():
    from tilesmith.ops.attention import CUDA_D256_SMEM_BYTES
    assert emulated("attention").attention_d256_smem_bytes() == CUDA_D256_SMEM_BYTES


def test_attention_forward_kernel_no_keys():
    q, k, v = attention_inputs(1, 2, 2, 20, 0, 64, torch.bfloat16)
    out, lse = run_attention_fwd(q, k, v, False, 0.125)
    assert (out == 0).all() and (lse == float("-inf")).all()


SPLIT_CASES = {
    # name: (batch, heads, kv heads, seq_q, seq_k, head dim, causal, keys per split,
    #        bool mask with a fully masked row?, dropout?)
    "decode_d64_gqa": (2, 4, 2, 1, 250, 64, False, 64, False, False),
    "d128_views_3_splits": (1, 2, 1, 20, 300, 128, False, 128, False, False),
    # Causal with seq_q < seq_k (top-left): the rows see the first keys only, so every split
    # past the first is empty and gives -inf partials.
    "d128_causal_empty_splits": (1, 2, 1, 40, 300, 128, True, 64, False, False),
    "d64_causal_query_blocks": (1, 1, 1, 150, 200, 64, True, 128, False, False),
    # Head dim 256 steps 32 keys at a time: two steps per split.
    "d256_edges": (1, 2, 2, 20, 200, 256, False, 64, False, False),
    "d80_in_d128_bool_mask": (1, 2, 2, 30, 190, 80, False, 64, True, False),
    "d64_gqa_dropout": (1, 4, 2, 33, 210, 64, False, 64, False, True),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_attention_forward_kernel_split_over_the_keys(case):
    """Flash-decoding: each split's fp32 partials, weighed by attention_split_combine_kernel,
    against float64 attention by the 2x rule; the lse within 1e-5."""
    b, h, hk, sq, sk, d, causal, per_split, masked, dropout = SPLIT_CASES[case]
    dtype, scale = torch.bfloat16, d ** -0.5
    q, k, v = attention_inputs(b, h, hk, sq, sk, d, dtype, seq_major="views" in case)
    mask = keep = drop = None
    if masked:
        mask = torch.rand(b, h, sq, sk) > 0.3
        mask[:, :, 3] = False
    if dropout:
        seed_value, dropout_p = 0x0123456789ABCDEF, 0.3
        drop = (torch.tensor([seed_value], dtype=torch.int64), dropout_p)
        keep = testing.attention_dropout_keep_reference(seed_value, b, h, sq, sk, dropout_p)
    out, lse = run_attention_fwd(q, k, v, causal, scale, mask, drop, keys_per_split=per_split)

    def reference(compute_dtype):
        return attention_reference(q, k, v, causal, scale, compute_dtype, mask=mask, keep=keep,
                                   dropout_p=drop[1] if drop else 0.0)

    (ref, ref_lse), (base, _) = reference(torch.float64), reference(dtype)
    assert_close_to_reference(out, ref, base)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[~finite]).all() and (out[~finite] == 0).all()


def run_attention_bwd(grad_out, q, k, v, out, lse, causal, scale, mask=None, dmask=None,
                      dropout=None, hopper=False):
    """The dK/dV and dQ kernels; delta = rowsum(dO * O) in fp32, as the op computes it.
    dmask: a zero fp32 tensor of the mask's shape to accumulate the additive mask's grad.
    hopper: attention_bwd_sm90a.cuh's kernels (which take what the wgmma forward takes)."""
    lib = emulated("attention")
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    grads = [guarded_empty(t.shape, t.dtype) for t in (q, k, v)]
    p = attention_params(q, k, v, scale)
    p.lse, p.delta = lse.data_ptr(), delta.data_ptr()
    p.grad_out, p.grad_out_strides = grad_out.data_ptr(), strides_of(grad_out)
    (dq, _), (dk, _), (dv, _) = grads
    p.dq, p.dk, p.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    p.dq_strides, p.dk_strides, p.dv_strides = strides_of(dq), strides_of(dk), strides_of(dv)
    set_mask(p, mask)
    set_dropout(p, dropout)
    if dmask is not None:
        p.dmask, p.dmask_strides = dmask.data_ptr(), broadcast_strides(dmask)
    ptrs, sizes, count = buffer_table([q, k, v, grad_out])
    error = ctypes.create_string_buffer(512)
    entry = emulated("attention_sm90a").emulate_attention_sm90a if hopper else \
        lib.emulate_attention
    status = entry(ctypes.byref(p), DTYPE_CODES[q.dtype], int(causal), 1, ptrs, sizes, count,
                   error, len(error))
    assert status == 0, error.value.decode()
    for (_, storage), name in zip(grads, ("dq", "dk", "dv")):
        assert_guards_untouched(storage, name)
    return dq, dk, dv


def check_attention_backward_kernels(case, dtype, hopper):
    b, h, hk, sq, sk, d, causal, seq_major = case
    q, k, v = attention_inputs(b, h, hk, sq, sk, d, dtype, seq_major=seq_major)
    scale = d ** -0.5
    out, lse = run_attention_fwd(q, k, v, causal, scale)
    grad_out = torch.randn(out.shape).to(dtype)
    grads = run_attention_bwd(grad_out, q, k, v, out, lse, causal, scale, hopper=hopper)

    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = attention_reference(*leaves, causal, scale)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    base_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    base = torch.nn.functional.scaled_dot_product_attention(
        *base_leaves, is_causal=causal, scale=scale, enable_gqa=h != hk)
    base_grads = torch.autograd.grad(base, base_leaves, grad_out)
    for got, want, baseline, name in zip(grads, ref_grads, base_grads, ("dq", "dk", "dv")):
        assert_close_to_reference(got, want, baseline, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_backward_kernels(case, dtype):
    check_attention_backward_kernels(ATTENTION_CASES[case], dtype, hopper=False)


# The wgmma dK/dV kernel: 128 keys per block (64 per warpgroup), 64 queries a step.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(HOPPER_ATTENTION_CASES))
def test_hopper_attention_backward_kernels(case, dtype):
    check_attention_backward_kernels(HOPPER_ATTENTION_CASES[case], dtype, hopper=True)


@pytest.mark.parametrize("hopper", [False, True], ids=["sm80", "sm90a"])
def test_attention_backward_kernels_keys_no_query_sees(hopper):
    # Causal with seq_k > seq_q: keys past the last query get zero gradients.
    q, k, v = attention_inputs(1, 1, 1, 10, 150, 128 if hopper else 64, torch.bfloat16)
    out, lse = run_attention_fwd(q, k, v, True, 0.125)
    dq, dk, dv = run_attention_bwd(torch.randn(out.shape).to(q.dtype), q, k, v, out, lse,
                                   True, 0.125, hopper=hopper)
    assert (dk[:, :, 10:] == 0).all() and (dv[:, :, 10:] == 0).all()
    assert dk[:, :, :10].abs().sum() > 0


@pytest.mark.parametrize("kernel", [False, True, "tma"], ids=["sm80", "sm90a", "sm90a_tma"])
def test_attention_kernels_read_broadcast_inputs(kernel):
    """Inputs with stride-0 dimensions, as ops.scaled_dot_product_attention passes the ones
    it broadcasts (here a query with one head for every query head, key and value shared
    by the batch, two query heads per kv head): read in place by every kernel, forward and
    backward, whose gradients are full-size (autograd then sums them)."""
    b, h, hk, sq, sk, d = 2, 4, 2, 40, 70, 64
    q = torch.randn(b, 1, sq, d).to(torch.bfloat16).expand(b, h, sq, d)
    k, v = (torch.randn(1, hk, sk, d).to(torch.bfloat16).expand(b, hk, sk, d)
            for _ in range(2))
    scale = d ** -0.5
    out, lse = run_attention_fwd(q, k, v, False, scale, hopper=kernel)
    grad_out = torch.randn(out.shape).to(torch.bfloat16)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]  # full-size copies
    ref, ref_lse = attention_reference(*leaves, False, scale)
    base_leaves = [t.contiguous().requires_grad_(True) for t in (q, k, v)]
    base = torch.nn.functional.scaled_dot_product_attention(*base_leaves, scale=scale,
                                                            enable_gqa=True)
    assert_close_to_reference(out, ref, base)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    if kernel == "tma":  # the backward has no TMA kernel
        return
    grads = run_attention_bwd(grad_out, q, k, v, out, lse, False, scale, hopper=kernel)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    base_grads = torch.autograd.grad(base, base_leaves, grad_out)
    for got, want, baseline, name in zip(grads, ref_grads, base_grads, ("dq", "dk", "dv")):
        assert_close_to_reference(got, want, baseline, name=name)


# --- conv2d: csrc/conv2d/conv2d_sm80.cuh (mma.sync) and conv2d_sm90a.cuh (wgmma) ----------------

class ConvParams(ctypes.Structure):
    """csrc/conv2d/conv2d.h's ConvParams (size checked against the C++ one)."""
    _fields_ = [("x", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("grad_out", ctypes.c_void_p),
                ("batch", ctypes.c_int64), ("height", ctypes.c_int64), ("width", ctypes.c_int64),
                ("channels", ctypes.c_int64), ("filters", ctypes.c_int64),
                ("groups", ctypes.c_int64),
                ("kernel_h", ctypes.c_int64), ("kernel_w", ctypes.c_int64),
                ("out_h", ctypes.c_int64), ("out_w", ctypes.c_int64),
                ("stride_h", ctypes.c_int), ("stride_w", ctypes.c_int),
                ("pad_h", ctypes.c_int), ("pad_w", ctypes.c_int),
                ("dilation_h", ctypes.c_int), ("dilation_w", ctypes.c_int),
                ("split_pixels", ctypes.c_int64)]


CONV_CASES = {
    # name: (N, C, H, W, K, R, S, stride, padding, dilation[, groups])
    "3x3_s1_p1": (2, 16, 9, 9, 24, 3, 3, (1, 1), (1, 1), (1, 1)),
    "3x3_s2_p1_odd13": (1, 8, 13, 13, 16, 3, 3, (2, 2), (1, 1), (1, 1)),
    "1x1_two_channel_and_filter_blocks": (1, 72, 5, 5, 136, 1, 1, (1, 1), (0, 0), (1, 1)),
    "5x5_dilation2_p3": (1, 8, 11, 11, 8, 5, 5, (1, 1), (3, 3), (2, 2)),
    "7x7_s2_p3": (1, 8, 17, 17, 16, 7, 7, (2, 2), (3, 3), (1, 1)),
    "3x1_s12_rect": (1, 16, 7, 12, 8, 3, 1, (1, 2), (1, 0), (1, 1)),
    "3x3_dilation21_s21": (1, 8, 10, 9, 8, 3, 3, (2, 1), (2, 1), (2, 1)),
    "3x3_groups2": (2, 16, 9, 9, 32, 3, 3, (1, 1), (1, 1), (1, 1), 2),
    "1x1_s2_groups3": (1, 24, 11, 11, 48, 1, 1, (2, 2), (0, 0), (1, 1), 3),
    # stride 3 over 4 x 2 pixels: dgrad's phases with one tap, none, and (w % 3 == 2) no
    # pixels at all.
    "2x2_s3_empty_phases": (2, 8, 4, 2, 8, 2, 2, (3, 3), (1, 1), (1, 1)),
    # 264 filters: the wgmma forward's 256-wide tiles (and a second, 8-wide tile column);
    # 264 channels: the same for the wgmma dgrad and wgrad.
    "3x3_264_filters": (1, 8, 5, 5, 264, 3, 3, (1, 1), (1, 1), (1, 1)),
    "3x3_s2_264_channels": (1, 264, 6, 5, 16, 3, 3, (2, 2), (1, 1), (1, 1)),
    # 64 and 128 channels: every chunk of every 128-byte stage-tile row read, as in the
    # layers of a ResNet (test_full_tiles_read_whole_sectors meters them).
    "3x3_64_channels": (2, 64, 8, 8, 64, 3, 3, (1, 1), (1, 1), (1, 1)),
    "1x1_s2_128_channels": (2, 128, 8, 8, 64, 1, 1, (2, 2), (0, 0), (1, 1)),
}


def conv_problem(case, dtype):
    n, c, h, w, k, r, s, stride, padding, dilation, *rest = CONV_CASES[case]
    groups = rest[0] if rest else 1
    cg = c // groups
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, cg, r, s) / (cg * r * s) ** 0.5).to(dtype).contiguous(
        memory_format=torch.channels_last)
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    cp = ConvParams(x=x.data_ptr(), weight=weight.data_ptr(), batch=n, height=h, width=w,
                    channels=cg, filters=k // groups, groups=groups, kernel_h=r, kernel_w=s,
                    out_h=p, out_w=q, stride_h=stride[0], stride_w=stride[1],
                    pad_h=padding[0], pad_w=padding[1], dilation_h=dilation[0],
                    dilation_w=dilation[1])
    return x, weight, cp, dict(stride=stride, padding=padding, dilation=dilation,
                               groups=groups)


def run_conv_pass(pass_index, dtype, cp, out, tensors, splits=1, kernel="sm80"):
    """Pass 0 forward, 1 dgrad, 2 wgrad, of conv2d_sm80.cuh (kernel="sm80", mma.sync) or
    conv2d_sm90a.cuh ("sm90a", wgmma)."""
    assert emulated("conv2d").conv_params_size() == ctypes.sizeof(ConvParams)
    entry = (emulated("conv2d").emulate_conv2d if kernel == "sm80"
             else emulated("conv2d_sm90a").emulate_conv2d_sm90a)
    ptrs, sizes, count = buffer_table(tensors)
    error = ctypes.create_string_buffer(512)
    status = entry(pass_index, DTYPE_CODES[dtype], ctypes.byref(cp), ctypes.byref(out), splits,
                   ptrs, sizes, count, error, len(error))
    assert status == 0, error.value.decode()


def nhwc(shape_nchw, dtype):
    """A guarded NaN-filled (N, C, H, W) output stored channels-last: (view, storage)."""
    n, c, h, w = shape_nchw
    flat, storage = guarded_empty((n, h, w, c), dtype)
    return flat.permute(0, 3, 1, 2), storage


@pytest.mark.parametrize("kernel", ["sm80", "sm90a"])
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", False),
                                                 ("gelu", False), ("relu", True)],
                         ids=["None", "relu", "gelu", "residual_relu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_forward_kernel(case, dtype, activation, residual, kernel):
    """The forward's epilogue: bias, (the residual, added before the activation, each
    group's columns of it), the pre-activation copy and the activation."""
    x, weight, cp, geometry = conv_problem(case, dtype)
    n, k, p, q = x.shape[0], weight.shape[0], cp.out_h, cp.out_w
    bias = torch.randn(k)
    out, out_storage = nhwc((n, k, p, q), dtype)
    pre, pre_storage = nhwc((n, k, p, q), dtype)
    params = MatmulParams(c=out.data_ptr(), batch=1, m=n * p * q, n=cp.filters, c_row_stride=k,
                          alpha=1.0, bias=bias.data_ptr(), activation=ACTIVATIONS[activation],
                          pre=pre.data_ptr(), pre_row_stride=k)
    shortcut = torch.zeros(n, k, p, q)
    if residual:
        shortcut = torch.randn(n, k, p, q).to(dtype).contiguous(
            memory_format=torch.channels_last)
        params.residual, params.residual_row_stride = shortcut.data_ptr(), k
        params.residual_before_activation = True
    run_conv_pass(0, dtype, cp, params, [x, weight], kernel=kernel)
    assert_guards_untouched(out_storage, "out")
    assert_guards_untouched(pre_storage, "pre")
    ref_pre = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(),
                                         **geometry) + shortcut.double()
    base_pre = torch.nn.functional.conv2d(x.float(), weight.float(), bias,
                                          **geometry) + shortcut.float()
    assert_close_to_reference(pre, ref_pre, base_pre.to(dtype), name="pre-activation")
    assert_close_to_reference(out, activate(ref_pre, activation),
                              activate(base_pre, activation).to(dtype))


@pytest.mark.parametrize("kernel", ["sm80", "sm90a"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_dgrad_kernel(case, dtype, kernel):
    x, weight, cp, geometry = conv_problem(case, dtype)
    n, c, h, w = x.shape
    grad = torch.randn(n, weight.shape[0], cp.out_h, cp.out_w).to(dtype).contiguous(
        memory_format=torch.channels_last)
    cp.grad_out = grad.data_ptr()
    dx, storage = nhwc((n, c, h, w), dtype)
    params = MatmulParams(c=dx.data_ptr(), batch=1, m=n * h * w, n=cp.channels, c_row_stride=c,
                          alpha=1.0)
    run_conv_pass(1, dtype, cp, params, [grad, weight], kernel=kernel)
    assert_guards_untouched(storage, "dx")

    def dgrad(compute):
        return torch.nn.grad.conv2d_input(x.shape, weight.to(compute), grad.to(compute),
                                          **geometry)
    assert_close_to_reference(dx, dgrad(torch.float64), dgrad(torch.float32).to(dtype))


@pytest.mark.parametrize("kernel", ["sm80", "sm90a"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_wgrad_kernel(case, dtype, splits, kernel):
    x, weight, cp, geometry = conv_problem(case, dtype)
    k, c, r, s = weight.shape
    grad = torch.randn(x.shape[0], k, cp.out_h, cp.out_w).to(dtype).contiguous(
        memory_format=torch.channels_last)
    cp.grad_out = grad.data_ptr()
    pixels = x.shape[0] * cp.out_h * cp.out_w
    cp.split_pixels = -(-pixels // splits)
    partial, storage = guarded_empty((splits, k, r * s * c), torch.float32)
    params = MatmulParams(c=partial.data_ptr(), batch=splits, m=cp.filters, n=c,
                          c_batch_stride=k * r * s * c, c_row_stride=r * s * c, alpha=1.0,
                          out_fp32=True)
    run_conv_pass(2, dtype, cp, params, [grad, x], splits, kernel=kernel)
    assert_guards_untouched(storage, "partial")
    # As the op finishes it: splits summed in order, (K, R, S, C) viewed as (K, C, R, S).
    dw = partial.sum(0).view(k, r, s, c).permute(0, 3, 1, 2).to(dtype)

    def wgrad(compute):
        return torch.nn.grad.conv2d_weight(x.to(compute), weight.shape, grad.to(compute),
                                           **geometry)
    assert_close_to_reference(dw, wgrad(torch.float64), wgrad(torch.float32).to(dtype))


def test_wgrad_split_count_fills_the_last_wave():
    """conv2d.h's wgrad_splits: among the allowed counts (each split >= min_pixels, at most
    four full waves of blocks), the one with the least time per pixel, waves / splits;
    ties to the fewest."""
    lib = emulated("conv2d")
    lib.conv2d_wgrad_splits.restype = ctypes.c_int64
    lib.conv2d_wgrad_splits.argtypes = [ctypes.c_int64] * 4

    def splits(pixels, blocks, slots, min_pixels=512):
        return lib.conv2d_wgrad_splits(pixels, blocks, slots, min_pixels)

    # ResNet-50's 3x3 256 layer at batch 32 on the wgmma kernels: 18 blocks a split, 132 SMs;
    # 7 splits fill one wave (8, the old choice, spilled 12 blocks into a second).
    assert splits(32 * 14 * 14, 18, 132) == 7
    assert splits(10 ** 6, 1, 132) == 132  # one block a split: one per SM
    assert splits(10 ** 6, 300, 264) == 4  # 5 waves for 4 splits' work: 1.25 a split
    assert splits(100, 4, 132) == 1        # too few pixels to split
    rng = random.Random(0)
    for _ in range(300):
        pixels, blocks = rng.randrange(1, 10 ** 6), rng.randrange(1, 2000)
        slots = rng.choice([108, 132, 264])
        got = splits(pixels, blocks, slots)
        most = max(1, min(pixels // 512, -(-4 * slots // blocks), 65535))
        assert 1 <= got <= most

        def per_split(count):
            return Fraction(-(-blocks * count // slots), count)
        best = min(per_split(count) for count in range(1, most + 1))
        assert per_split(got) == best
        assert all(per_split(count) > best for count in range(1, got))


# --- FP8 scaled GEMM: csrc/fp8/scaled_gemm_sm90a.cuh (wgmma) ------------------------------------

class ScaledGemmParams(ctypes.Structure):
    """csrc/fp8/scaled_gemm.h's ScaledGemmParams (size checked against the C++ one)."""
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("scale_a", ctypes.c_void_p), ("scale_b", ctypes.c_void_p),
                ("bias", ctypes.c_void_p),
                ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("a_row_stride", ctypes.c_int64), ("b_row_stride", ctypes.c_int64),
                ("scale_a_kind", ctypes.c_int), ("scale_b_kind", ctypes.c_int),
                ("scale_a_row_stride", ctypes.c_int64), ("scale_b_row_stride", ctypes.c_int64),
                ("out_dtype", ctypes.c_int), ("activation", ctypes.c_int),
                ("residual", ctypes.c_void_p), ("residual_row_stride", ctypes.c_int64),
                ("pre", ctypes.c_void_p)]


OUT_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
SCALE_KINDS = {"tensor": 0, "row": 1, "block": 2}
FP8_CASES = {
    # name: (m, n, k, a format, b format, scaling, a row padding)
    "tensor_e4m3_tails": (130, 200, 160, torch.float8_e4m3fn, torch.float8_e4m3fn, "tensor", 0),
    "row_e5m2_e4m3_strided_a": (70, 136, 256, torch.float8_e5m2, torch.float8_e4m3fn, "row", 32),
    "row_e4m3_e5m2": (64, 128, 48, torch.float8_e4m3fn, torch.float8_e5m2, "row", 0),
    "block_e4m3_k_tail": (129, 257, 272, torch.float8_e4m3fn, torch.float8_e4m3fn, "block", 0),
    # More K tiles than pipeline stages: every stage is refilled, several times.
    "row_e4m3_long_k": (100, 130, 1040, torch.float8_e4m3fn, torch.float8_e4m3fn, "row", 0),
    # n >= 256: 256-wide tiles, one full and one partial; a long K refills their 4 stages.
    "tensor_n256_tiles_long_k": (70, 400, 784, torch.float8_e4m3fn, torch.float8_e5m2,
                                 "tensor", 16),
    "row_n256_exact": (130, 256, 160, torch.float8_e5m2, torch.float8_e4m3fn, "row", 0),
    "block_e5m2_long_k": (64, 128, 1104, torch.float8_e5m2, torch.float8_e4m3fn, "block", 16),
}


def fp8_operands(m, n, k, a_format, b_format, scaling, pad):
    """a (m, k) as a view with row stride k + pad, b (k, n) column-major, and the scales."""
    a_storage = (torch.randn(m, k + pad) * 4).to(a_format)
    a = a_storage[:, :k]
    b = (torch.randn(n, k) * 4).to(b_format).t()  # (k, n), k contiguous
    blocks_k, blocks_n = -(-k // 128), -(-n // 128)
    shapes = {"tensor": ((), ()), "row": ((m, 1), (1, n)),
              "block": ((m, blocks_k), (blocks_k, blocks_n))}[scaling]
    scale_a = torch.rand(shapes[0]) * 0.5 + 0.25
    scale_b = torch.rand(shapes[1]) * 0.5 + 0.25
    return a, b, scale_a, scale_b


def run_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, scaling, tma_blocks=0, *,
                    activation=None, residual=None, want_pre=False):
    """The cp.async kernel, or with tma_blocks the TMA kernel on that many blocks: out, or
    (out, pre) with want_pre."""
    lib = emulated("fp8")
    assert lib.scaled_gemm_params_size() == ctypes.sizeof(ScaledGemmParams)
    m, k = a.shape
    n = b.shape[1]
    bt = b.t()
    assert a.stride(1) == 1 and bt.stride(1) == 1
    out, storage = guarded_empty((m, n), out_dtype)
    p = ScaledGemmParams(a=a.data_ptr(), b=bt.data_ptr(), out=out.data_ptr(),
                         scale_a=scale_a.data_ptr(), scale_b=scale_b.data_ptr(),
                         bias=bias.data_ptr() if bias is not None else None, m=m, n=n, k=k,
                         a_row_stride=a.stride(0), b_row_stride=bt.stride(0),
                         scale_a_kind=SCALE_KINDS[scaling], scale_b_kind=SCALE_KINDS[scaling],
                         scale_a_row_stride=scale_a.shape[-1] if scaling == "block" else 0,
                         scale_b_row_stride=scale_b.shape[-1] if scaling == "block" else 0,
                         out_dtype=OUT_DTYPES[out_dtype], activation=ACTIVATIONS[activation])
    if residual is not None:
        p.residual, p.residual_row_stride = residual.data_ptr(), residual.stride(0)
    pre, pre_storage = guarded_empty((m, n), out_dtype) if want_pre else (None, None)
    if pre is not None:
        p.pre = pre.data_ptr()
    ptrs, sizes, count = buffer_table([a, bt])
    error = ctypes.create_string_buffer(512)
    status = lib.emulate_scaled_gemm(ctypes.byref(p), int(a.dtype == torch.float8_e5m2),
                                     int(b.dtype == torch.float8_e5m2), tma_blocks, ptrs, sizes,
                                     count, error, len(error))
    assert status == 0, error.value.decode()
    assert_guards_untouched(storage, "out")
    if pre is None:
        return out
    assert_guards_untouched(pre_storage, "pre")
    return out, pre


# The cp.async kernel (0), and the TMA kernel on one block (every tile's K steps through one
# ring, whose phases wrap) and on three.
FP8_KERNELS = {"cp_async": 0, "tma": 1, "tma_3_blocks": 3}


@pytest.mark.parametrize("kernel", list(FP8_KERNELS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(FP8_CASES))
def test_scaled_gemm_wgmma_kernel(case, out_dtype, kernel):
    from tilesmith.testing import scaled_gemm_reference, sqnr_db

    m, n, k, a_format, b_format, scaling, pad = FP8_CASES[case]
    a, b, scale_a, scale_b = fp8_operands(m, n, k, a_format, b_format, scaling, pad)
    bias = torch.randn(n)
    out = run_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, scaling,
                          tma_blocks=FP8_KERNELS[kernel])
    ref = scaled_gemm_reference(a, b, scale_a, scale_b, bias)
    # fp8 products are exact in fp32: the only error is fp32 summation (and the output's
    # rounding), far inside the 28 dB bar the op is held to.
    if out_dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    else:
        assert_close_to_reference(out, ref, ref.float().to(out_dtype))
    assert sqnr_db(out, ref) > 40


# Each case with another output dtype: the residual is read, and out and pre written, in it.
FP8_EPILOGUE_CASES = {"row_e4m3_e5m2": torch.float16, "block_e4m3_k_tail": torch.bfloat16,
                      "tensor_n256_tiles_long_k": torch.float32}


@pytest.mark.parametrize("kernel", ["cp_async", "tma"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS), ids=str)
@pytest.mark.parametrize("case", list(FP8_EPILOGUE_CASES))
def test_scaled_gemm_epilogue(case, activation, kernel):
    """act(product + bias) + residual, the residual read through its row stride in the
    output's dtype, and the pre-activation stored beside: on both kernels, on 128- and
    256-wide tiles, with per-block scales (whose epilogue scales nothing), in fp16, bf16
    and fp32, against the float64 reference (rounded once, for the 2x rule)."""
    from tilesmith.ops.gemm import torch_activation
    from tilesmith.testing import scaled_gemm_reference

    m, n, k, a_format, b_format, scaling, pad = FP8_CASES[case]
    out_dtype = FP8_EPILOGUE_CASES[case]
    a, b, scale_a, scale_b = fp8_operands(m, n, k, a_format, b_format, scaling, pad)
    bias = torch.randn(n)
    residual = torch.randn(m, n + 8).to(out_dtype)[:, :n]  # a row stride != n
    out, pre = run_scaled_gemm(a, b, scale_a, scale_b, bias, out_dtype, scaling,
                               tma_blocks=FP8_KERNELS[kernel], activation=activation,
                               residual=residual, want_pre=True)
    ref_pre = scaled_gemm_reference(a, b, scale_a, scale_b, bias)
    ref = torch_activation(ref_pre, activation) + residual.double()
    for got, want, name in ((pre, ref_pre, "pre-activation"), (out, ref, "output")):
        if out_dtype == torch.float32:  # fp32 summation error only
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        else:
            assert_close_to_reference(got, want, want.float().to(out_dtype), name=name)


# --- FP8 quantization: csrc/fp8/quantize_sm90a.cuh --------------------------------------------

class QuantizeParams(ctypes.Structure):
    """csrc/fp8/quantize.h's QuantizeParams (size checked against the C++ one)."""
    _fields_ = [("x", ctypes.c_void_p), ("m", ctypes.c_int64), ("k", ctypes.c_int64),
                ("x_row_stride", ctypes.c_int64), ("x_col_stride", ctypes.c_int64),
                ("q", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("scale_row_stride", ctypes.c_int64), ("amax", ctypes.c_void_p),
                ("granularity", ctypes.c_int), ("block_m", ctypes.c_int),
                ("block_k", ctypes.c_int), ("input", ctypes.c_int), ("e5m2", ctypes.c_bool)]


QUANTIZE_INPUTS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
QUANTIZE_GRANULARITIES = {"tensor": 0, "row": 1, "block": 2, "block2d": 3}
# The quantize kernels' paths (quantize_emulated.cpp's path()).
ELEMENT_LOADS, ROW_VECTORS, COLUMN_TILES = 0, 1, 2
QUANTIZE_CASES = {
    # name: (m, k, input dtype, fp8 format, granularity, (block_m, block_k), layout,
    #        path expected: ELEMENT_LOADS, ROW_VECTORS or COLUMN_TILES)
    "row_bf16_rows_of_16_bytes": (19, 264, torch.bfloat16, torch.float8_e4m3fn, "row", (1, 1),
                                  "contiguous", ROW_VECTORS),
    "row_fp16_one_long_row": (1, 4096, torch.float16, torch.float8_e5m2, "row", (1, 1),
                              "contiguous", ROW_VECTORS),
    "row_fp32_odd_k": (10, 37, torch.float32, torch.float8_e5m2, "row", (1, 1), "contiguous",
                       ELEMENT_LOADS),
    # Two column groups per row (2048 wide for bf16): the atomic max spans blocks.
    "tensor_bf16_two_column_groups": (33, 2200, torch.bfloat16, torch.float8_e4m3fn, "tensor",
                                      (1, 1), "contiguous", ROW_VECTORS),
    "tensor_fp16_transposed": (40, 300, torch.float16, torch.float8_e5m2, "tensor", (1, 1),
                               "transposed", ELEMENT_LOADS),
    # Column-major with 16-byte aligned columns: read in place by the transposing kernel.
    # 40 rows: a tile of 32 and one of 8; k = 272: two 128-column cast steps and 16 more.
    "row_bf16_column_major": (40, 272, torch.bfloat16, torch.float8_e4m3fn, "row", (1, 1),
                              "column_major", COLUMN_TILES),
    # Per-tensor: the amax read along memory rows; k = 1040 spans three column groups.
    "tensor_fp16_column_major": (24, 1040, torch.float16, torch.float8_e5m2, "tensor", (1, 1),
                                 "column_major", COLUMN_TILES),
    "block_bf16_1x128_k_tail": (9, 392, torch.bfloat16, torch.float8_e4m3fn, "block", (1, 128),
                                "contiguous", ROW_VECTORS),
    "block_fp32_1x16_padded_rows": (5, 100, torch.float32, torch.float8_e5m2, "block", (1, 16),
                                    "padded", ROW_VECTORS),
    "block_bf16_1x64_transposed": (21, 130, torch.bfloat16, torch.float8_e4m3fn, "block",
                                   (1, 64), "transposed", ELEMENT_LOADS),
    "block_fp16_1x128_column_major": (64, 400, torch.float16, torch.float8_e5m2, "block",
                                      (1, 128), "column_major", COLUMN_TILES),
    "block2d_bf16_128x128_tails": (130, 264, torch.bfloat16, torch.float8_e4m3fn, "block2d",
                                   (128, 128), "contiguous", ROW_VECTORS),
    "block2d_fp16_16x64_odd": (37, 150, torch.float16, torch.float8_e5m2, "block2d", (16, 64),
                               "padded", ELEMENT_LOADS),
}


def quantize_input(m, k, dtype, layout):
    """x (m, k) with a zero row, a row of tiny values and one large value, laid out as asked,
    inside NaN-filled storage: a read outside x would turn an amax (and a scale) into NaN."""
    x = torch.randn(m, k) * 5
    x[-1, -1] = 1e4  # in the last column group
    if m > 2:
        x[0] = 0
        x[1] *= 1e-30
    if layout == "transposed":  # column-major, unaligned: element loads, strided
        storage = torch.full((k + 3, m + 5), float("nan"), dtype=dtype)
        view = storage[1:k + 1, 2:m + 2].t()
    elif layout == "column_major":  # 16-byte aligned columns (m a multiple of 8)
        storage = torch.full((k + 2, m + 16), float("nan"), dtype=dtype)
        view = storage[1:k + 1, 8:m + 8].t()
    elif layout == "padded":  # row stride > k, the padding NaN
        storage = torch.full((m + 2, k + 4), float("nan"), dtype=dtype)
        view = storage[1:m + 1, :k]
    else:
        storage = torch.full((m * k + 2 * GUARD,), float("nan"), dtype=dtype)
        view = storage[GUARD:GUARD + m * k].view(m, k)
    view.copy_(x.to(dtype))
    return view


def emulate_quantize(case, x):
    """(q as uint8, scale) of QUANTIZE_CASES[case]'s kernel for x (laid out by
    quantize_input), checking the path it took and that it wrote only its outputs."""
    m, k, dtype, fp8, granularity, (block_m, block_k), layout, path = QUANTIZE_CASES[case]
    lib = emulated("quantize")
    assert lib.quantize_params_size() == ctypes.sizeof(QuantizeParams)
    scale_shape = testing.quantize_fp8_reference(x, fp8, granularity, block_m, block_k)[1].shape
    # q: 0x7f (NaN in both formats) everywhere the kernel must not write, and before it does.
    q_storage = torch.full((m * k + 2 * GUARD,), 0x7F, dtype=torch.uint8)
    q = q_storage[GUARD:GUARD + m * k].view(m, k)
    scale, scale_storage = guarded_empty(scale_shape, torch.float32)
    amax = torch.zeros(1)
    p = QuantizeParams(x=x.data_ptr(), m=m, k=k, x_row_stride=x.stride(0),
                       x_col_stride=x.stride(1), q=q.data_ptr(), scale=scale.data_ptr(),
                       scale_row_stride=scale_shape[-1] if granularity.startswith("block")
                       else 1, amax=amax.data_ptr(),
                       granularity=QUANTIZE_GRANULARITIES[granularity], block_m=block_m,
                       block_k=block_k, input=QUANTIZE_INPUTS[dtype],
                       e5m2=fp8 == torch.float8_e5m2)
    path_taken = ctypes.c_int()
    error = ctypes.create_string_buffer(512)
    status = lib.emulate_quantize_fp8(ctypes.byref(p), ctypes.byref(path_taken), error,
                                      len(error))
    assert status == 0, error.value.decode()
    assert path_taken.value == path
    for band in (q_storage[:GUARD], q_storage[-GUARD:]):
        assert (band == 0x7F).all(), "q: the kernel wrote outside the output"
    assert_guards_untouched(scale_storage, "scale")
    return q, scale


@pytest.mark.parametrize("case", list(QUANTIZE_CASES))
def test_quantize_fp8_kernels(case):
    """Bit for bit the reference's fp8 values and scales, through every path."""
    m, k, dtype, fp8, granularity, (block_m, block_k), layout, path = QUANTIZE_CASES[case]
    x = quantize_input(m, k, dtype, layout)
    ref_q, ref_scale = testing.quantize_fp8_reference(x, fp8, granularity, block_m, block_k)
    q, scale = emulate_quantize(case, x)
    assert torch.equal(scale, ref_scale), (scale, ref_scale)
    assert torch.equal(q, ref_q.view(torch.uint8)), "fp8 bits differ"
    assert ref_q.float().abs().max() == torch.finfo(fp8).max  # the large value saturated


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("case", ["row_bf16_rows_of_16_bytes", "tensor_bf16_two_column_groups",
                                  "tensor_fp16_transposed", "row_bf16_column_major",
                                  "block_fp16_1x128_column_major", "block2d_fp16_16x64_odd"])
def test_quantize_fp8_kernels_keep_nan_and_inf_visible(case, special):
    """A NaN or an infinity in x: NaN and infinite scales, and NaN values, where the
    reference has them (test_fp8's rule), on every path; NaN compared by position, as the
    hardware's NaN bits need not be the CPU cast's."""
    m, k, dtype, fp8, granularity, (block_m, block_k), layout, path = QUANTIZE_CASES[case]
    x = quantize_input(m, k, dtype, layout)
    x[m // 2, k - 3] = special
    ref_q, ref_scale = testing.quantize_fp8_reference(x, fp8, granularity, block_m, block_k)
    q, scale = emulate_quantize(case, x)
    q = q.view(fp8).float()
    assert not torch.isfinite(ref_scale).all()  # the case is what it says
    exactly = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(scale, ref_scale, **exactly)
    torch.testing.assert_close(q, ref_q.float(), **exactly)


def packed_strides(t):
    """(batch, head, seq) strides of a packed (tokens, heads, dim) tensor: batch stride 0."""
    assert t.stride(2) == 1
    return AttentionStrides(0, t.stride(1), t.stride(0))


@pytest.mark.parametrize("kernel,dropout_p", [("sm80", 0.0), ("sm80", 0.25), ("sm80_split", 0.0),
                                              ("sm80_split", 0.25), ("sm90a", 0.0),
                                              ("sm90a", 0.25), ("sm90a_tma", 0.0)],
                         ids=["sm80", "sm80_dropout", "sm80_split", "sm80_split_dropout",
                              "sm90a", "sm90a_dropout", "sm90a_tma"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_kernels_on_packed_varlen_batches(causal, kernel, dropout_p):
    # Sequences of 37, 0, 70 and 5 queries over 50, 20, 66 and 5 keys (sm90a: 150 queries
    # over 140 keys for the third, past one 128-row block); GQA 4:2; d=64 (sm90a: 128). With
    # dropout, sequence i drops what batch entry i of the dense mask drops, over its own
    # (sequence-local) positions. sm90a_tma: the TMA-fed forward (whose tiles run on into
    # the next sequence's rows), then the wgmma backward. sm80_split: the forward in two
    # splits of 64 keys (the first sequence's second split is empty), then its backward.
    hopper = kernel.startswith("sm90a")
    dtype, d, heads, heads_kv = torch.bfloat16, 128 if hopper else 64, 4, 2
    lengths_q, lengths_k = [37, 0, 150 if hopper else 70, 5], [50, 20, 140 if hopper else 66, 5]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lengths_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lengths_k)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, d).to(dtype)
    k = torch.randn(int(cu_k[-1]), heads_kv, d).to(dtype)
    v = torch.randn(int(cu_k[-1]), heads_kv, d).to(dtype)
    scale = d ** -0.5
    lib = emulated("attention")
    out, out_storage = guarded_empty(q.shape, dtype)
    lse, lse_storage = guarded_empty((heads, q.shape[0]), torch.float32)
    p = AttentionParams(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
                        lse=lse.data_ptr(), q_strides=packed_strides(q),
                        k_strides=packed_strides(k), v_strides=packed_strides(v),
                        out_strides=packed_strides(out), lse_batch_stride=0,
                        lse_head_stride=q.shape[0], batch=len(lengths_q), heads=heads,
                        heads_kv=heads_kv, seqlen_q=max(lengths_q), seqlen_k=max(lengths_k),
                        head_dim=d,
                        cu_seqlens_q=cu_q.data_ptr(), cu_seqlens_k=cu_k.data_ptr(),
                        tokens_q=q.shape[0], tokens_k=k.shape[0],
                        scale_log2=scale * math.log2(math.e), scale=scale)
    seed_value = 0x2545F4914F6CDD1D
    seed = torch.tensor([seed_value], dtype=torch.int64)
    keep = None
    if dropout_p:
        set_dropout(p, (seed, dropout_p))
        keep = testing.attention_dropout_keep_reference(seed_value, len(lengths_q), heads,
                                                        max(lengths_q), max(lengths_k),
                                                        dropout_p)
    partials = set_split(p, 64 if kernel == "sm80_split" else 0, heads * q.shape[0], d)
    error = ctypes.create_string_buffer(512)

    def launch(backward):
        ptrs, sizes, count = buffer_table([q, k, v] + ([grad_out] if backward else []))
        if kernel == "sm90a_tma" and not backward:
            status = emulated("attention_sm90a").emulate_attention_fwd_tma(
                ctypes.byref(p), DTYPE_CODES[dtype], int(causal), ptrs, sizes, count, error,
                len(error))
        else:
            entry = emulated("attention_sm90a").emulate_attention_sm90a if hopper else \
                lib.emulate_attention
            status = entry(ctypes.byref(p), DTYPE_CODES[dtype], int(causal), int(backward),
                           ptrs, sizes, count, error, len(error))
        assert status == 0, error.value.decode()

    launch(False)
    assert_guards_untouched(out_storage, "out")
    assert_guards_untouched(lse_storage, "lse")
    assert_partials_written(partials)
    p.keys_per_split = 0  # the backward has no split
    grad_out = torch.randn(q.shape).to(dtype)
    delta = (grad_out.float() * out.float()).sum(-1).t().contiguous()  # (heads, tokens)
    grads = [guarded_empty(t.shape, dtype) for t in (q, k, v)]
    (dq, _), (dk, _), (dv, _) = grads
    p.grad_out, p.grad_out_strides, p.delta = grad_out.data_ptr(), packed_strides(grad_out), \
        delta.data_ptr()
    p.dq, p.dk, p.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    p.dq_strides, p.dk_strides, p.dv_strides = (packed_strides(t) for t in (dq, dk, dv))
    launch(True)
    for (_, storage), name in zip(grads, ("dq", "dk", "dv")):
        assert_guards_untouched(storage, name)

    # Per sequence: SDPA-layout views, the float64 reference and the bf16 baseline.
    def per_sequence(compute, tensors):
        outs, grads_out = [], [[], [], []]
        for i in range(len(lengths_q)):
            sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            leaves = [t[rows].transpose(0, 1)[None].to(compute).requires_grad_(True)
                      for t, rows in zip(tensors, (sq, sk, sk))]
            if keep is not None:  # both precisions: SDPA cannot take a given dropout mask
                o, _ = attention_reference(*leaves, causal, scale, compute,
                                           keep=keep[i:i + 1, :, :lengths_q[i], :lengths_k[i]],
                                           dropout_p=dropout_p)
            elif compute == torch.float64:
                o, _ = attention_reference(*leaves, causal, scale)
            else:
                o = torch.nn.functional.scaled_dot_product_attention(
                    *leaves, is_causal=causal, scale=scale, enable_gqa=True)
            g = grad_out[sq].transpose(0, 1)[None].to(compute)
            gs = torch.autograd.grad(o, leaves, g) if o.numel() and leaves[1].shape[2] else [
                torch.zeros_like(x) for x in leaves]
            outs.append(o[0].transpose(0, 1))
            for acc, x in zip(grads_out, gs):
                acc.append(x[0].transpose(0, 1))
        return torch.cat(outs), [torch.cat(x) for x in grads_out]

    ref, ref_grads = per_sequence(torch.float64, (q, k, v))
    base, base_grads = per_sequence(dtype, (q, k, v))
    assert_close_to_reference(out, ref, base.detach())
    for got, want, baseline, name in zip((dq, dk, dv), ref_grads, base_grads,
                                         ("dq", "dk", "dv")):
        assert_close_to_reference(got, want, baseline, name=name)


MASK_CASES = {
    # name: (batch, heads, kv heads, seq_q, seq_k, head dim, causal, mask shape, bool?,
    #        a fully masked row?)
    "bool_b1qk_masked_row": (2, 2, 2, 70, 90, 64, False, (2, 1, 70, 90), True, True),
    "additive_1hqk": (1, 2, 2, 65, 80, 64, False, (1, 2, 65, 80), False, False),
    "additive_qk_neg_inf_row": (2, 2, 2, 33, 70, 128, False, (1, 1, 33, 70), False, True),
    "bool_bh1k": (2, 2, 2, 40, 100, 128, False, (2, 2, 1, 100), True, False),
    "additive_d256_neg_inf_row": (1, 2, 2, 40, 70, 256, False, (1, 2, 40, 70), False, True),
    # Several blocks of queries and keys in each kernel (the wgmma ones: 128 query rows and
    # 128 keys a forward step, 128 keys and 64 queries a dK/dV step), the causal diagonal,
    # and a mask per query head of a kv group.
    "additive_causal_gqa_blocks": (1, 4, 2, 150, 260, 128, True, (1, 4, 150, 260), False, True),
    "bool_b11k_causal_d40": (2, 2, 1, 140, 200, 40, True, (2, 1, 1, 200), True, False),
}
# The wgmma kernels take head dims up to 128.
MASK_KERNELS = [pytest.param(case, kernel, id=f"{case}-{kernel}")
                for case in MASK_CASES for kernel in ("sm80", "sm90a")
                if kernel == "sm80" or MASK_CASES[case][5] <= 128]


@pytest.mark.parametrize("case,kernel", MASK_KERNELS)
def test_attention_kernels_with_masks(case, kernel):
    _check_masked_attention_kernels(MASK_CASES[case][:7], _case_mask(case), kernel)


@pytest.mark.parametrize("kernel", ["sm80", "sm90a"])
def test_attention_backward_with_a_broadcast_mask_expanded(kernel):
    """Under torch.use_deterministic_algorithms(True), ops/attention.py hands the backward a
    broadcast mask expanded to (batch, heads, seq_q, seq_k) and a full-size gradient: the
    kernels read the mask through its zero strides and write each gradient element once."""
    case = "additive_qk_neg_inf_row"
    _check_masked_attention_kernels(MASK_CASES[case][:7], _case_mask(case), kernel,
                                    expanded=True)


# (batch, heads, kv heads, seq_q, seq_k, head dim, causal) for an fp32 mask per head; the
# wgmma kernels take head dims up to 128.
FLOAT32_MASK_KERNELS = [
    pytest.param((1, 2, 2, 65, 130, 64, False), kernel, id=f"d64-{kernel}")
    for kernel in ("sm80", "sm90a")] + [
    pytest.param((1, 2, 1, 70, 90, 256, True), "sm80", id="d256_gqa_causal-sm80")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("geometry,kernel", FLOAT32_MASK_KERNELS)
def test_attention_kernels_read_a_float32_mask_as_it_is(geometry, kernel, dtype):
    """An fp32 additive mask beside fp16/bf16 queries, as PyTorch's SDPA takes it, is read
    in fp32 (MaskKind::kAdditiveFloat32): around -300 its fractions would be lost in fp16
    (steps of 0.25) and bf16 (steps of 2), and a row near -7e4 would become -inf in fp16,
    a fully masked row of zeros where PyTorch gives that row's softmax (a constant added
    to a whole row does not change it). (With dropout: test_attention_kernels_with_dropout.)"""
    _, h, _, sq, sk, *_ = geometry
    mask = torch.randn(1, h, sq, sk) * 2 - 300
    mask[:, :, 7] -= 7e4
    _check_masked_attention_kernels(geometry, mask, kernel, dtype)


def _case_mask(case):
    """The mask of MASK_CASES[case], in the queries' dtype (bf16) when additive."""
    *_, shape, boolean, masked_row = MASK_CASES[case]
    if boolean:
        mask = torch.rand(shape) > 0.3
        if masked_row:
            mask[:, :, 4] = False
    else:
        mask = torch.randn(shape).to(torch.bfloat16)
        if masked_row:
            mask[:, :, 7] = float("-inf")
    return mask


def _check_masked_attention_kernels(geometry, mask, kernel, dtype=torch.bfloat16,
                                    expanded=False):
    b, h, hk, sq, sk, d, causal = geometry
    shape, boolean = tuple(mask.shape), mask.dtype == torch.bool
    hopper = kernel == "sm90a"
    q, k, v = attention_inputs(b, h, hk, sq, sk, d, dtype)
    scale = d ** -0.5
    out, lse = run_attention_fwd(q, k, v, causal, scale, mask, hopper=hopper)
    grad_out = torch.randn(out.shape).to(dtype)
    seen = mask.expand(b, h, sq, sk) if expanded else mask
    dmask = None if boolean else torch.zeros(seen.shape, dtype=torch.float32)
    grads = run_attention_bwd(grad_out, q, k, v, out, lse, causal, scale, seen, dmask,
                              hopper=hopper)
    if expanded:
        dmask = dmask.sum_to_size(shape)

    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    if not boolean:
        leaves.append(mask.double().requires_grad_(True))
    ref, ref_lse = attention_reference(*leaves[:3], causal, scale,
                                       mask=leaves[3] if not boolean else mask)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    base_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    base_mask = mask if boolean else mask.clone().requires_grad_(True)
    # SDPA takes no mask with is_causal: the causal mask joins the given one.
    below = torch.ones(sq, sk, dtype=torch.bool).tril()
    if causal:
        base_attn_mask = (base_mask & below if boolean
                          else base_mask.masked_fill(~below, float("-inf")))
    else:
        base_attn_mask = base_mask
    base = torch.nn.functional.scaled_dot_product_attention(
        *base_leaves, attn_mask=base_attn_mask, scale=scale, enable_gqa=h != hk)
    base_grads = torch.autograd.grad(base, base_leaves + ([] if boolean else [base_mask]),
                                     grad_out)
    assert_close_to_reference(out, ref, base)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[~finite]).all()
    # The mask's gradient at the queries' precision, PyTorch's too: a flash-style backward's
    # dmask carries the rounding of the output (through rowsum(dO * O)) whatever the mask's
    # dtype, while PyTorch's CPU math runs an fp32 mask's gradient in fp32.
    got = list(grads) + ([] if boolean else [dmask.to(dtype)])
    base_grads = list(base_grads[:3]) + [g.to(dtype) for g in base_grads[3:]]
    for g, want, baseline, name in zip(got, ref_grads, base_grads, ("dq", "dk", "dv", "dmask")):
        assert torch.isfinite(g).all() and torch.isfinite(baseline).all(), name
        assert_close_to_reference(g, want, baseline, name=name)


DROPOUT_CASES = {
    # name: (batch, heads, kv heads, seq_q, seq_k, head dim, causal,
    #        float mask (shape, dtype) or None)
    "d64_gqa_causal": (2, 4, 2, 70, 90, 64, True, None),
    "d128_edges": (1, 2, 1, 65, 129, 128, False, None),
    "d64_float_mask": (1, 2, 2, 40, 72, 64, False, ((1, 2, 40, 72), torch.bfloat16)),
    "d128_causal_float32_mask": (1, 2, 2, 40, 72, 128, True, ((1, 1, 40, 72), torch.float32)),
    "d256_gqa_causal": (1, 2, 1, 70, 90, 256, True, None),
    # The wgmma kernels: several query blocks (128 rows) and key steps (128 keys forward,
    # 64 queries a dK/dV step, 64 keys a dQ step), the two words of a forward step's bits.
    "d128_causal_gqa_blocks": (1, 4, 2, 150, 260, 128, True, None),
    "d40_in_d64_edges": (2, 2, 2, 130, 70, 40, False, None),
}
# The wgmma kernels take head dims up to 128, and dropout without a mask.
DROPOUT_KERNELS = [pytest.param(case, kernel, id=f"{case}-{kernel}")
                   for case in DROPOUT_CASES for kernel in ("sm80", "sm90a")
                   if kernel == "sm80" or (DROPOUT_CASES[case][5] <= 128
                                           and DROPOUT_CASES[case][7] is None)]


@pytest.mark.parametrize("case,kernel", DROPOUT_KERNELS)
def test_attention_kernels_with_dropout(case, kernel):
    """Forward and backward with dropout_p = 0.3 against float64 attention that drops what
    the documented Philox mask drops (tilesmith.testing's reference implementation: the
    same bits as the Triton kernels' ops.attention_dropout_mask), by the 2x rule."""
    b, h, hk, sq, sk, d, causal, mask_spec = DROPOUT_CASES[case]
    hopper = kernel == "sm90a"
    dtype, dropout_p, seed_value = torch.bfloat16, 0.3, 0x0123456789ABCDEF
    q, k, v = attention_inputs(b, h, hk, sq, sk, d, dtype)
    mask = None if mask_spec is None else torch.randn(mask_spec[0]).to(mask_spec[1])
    seed = torch.tensor([seed_value], dtype=torch.int64)
    keep = testing.attention_dropout_keep_reference(seed_value, b, h, sq, sk, dropout_p)
    scale = d ** -0.5
    out, lse = run_attention_fwd(q, k, v, causal, scale, mask, (seed, dropout_p), hopper=hopper)
    grad_out = torch.randn(out.shape).to(dtype)
    dmask = None if mask is None else torch.zeros(mask.shape, dtype=torch.float32)
    grads = run_attention_bwd(grad_out, q, k, v, out, lse, causal, scale, mask, dmask,
                              (seed, dropout_p), hopper=hopper)

    def reference(compute_dtype):
        leaves = [t.to(compute_dtype).requires_grad_(True)
                  for t in (q, k, v) + (() if mask is None else (mask,))]
        o, lse = attention_reference(*leaves[:3], causal, scale, compute_dtype,
                                     mask=leaves[3] if mask is not None else None, keep=keep,
                                     dropout_p=dropout_p)
        return o, lse, torch.autograd.grad(o, leaves, grad_out.to(compute_dtype))

    ref, ref_lse, ref_grads = reference(torch.float64)
    base, _, base_grads = reference(dtype)
    assert_close_to_reference(out, ref, base)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)  # dropout-free
    got = list(grads) + ([] if mask is None else [dmask.to(dtype)])
    for g, want, baseline, name in zip(got, ref_grads, base_grads, ("dq", "dk", "dv", "dmask")):
        assert torch.isfinite(g).all(), name
        assert_close_to_reference(g, want, baseline, name=name)


def test_attention_dropout_mask_reference_is_the_triton_kernels_mask():
    """The mask the emulated test above checks the CUDA kernels against is the Triton
    kernels' (which test_attention checks against Philox's known-answer vectors)."""
    pytest.importorskip("triton")
    seed_value, shape = 0x0123456789ABCDEF, (2, 3, 37, 45)
    keep = tilesmith.ops.attention_dropout_mask(torch.tensor([seed_value]), *shape, 0.3)
    assert torch.equal(keep, testing.attention_dropout_keep_reference(seed_value, *shape, 0.3))


# --- depthwise conv2d: csrc/conv2d/depthwise.cuh --------------------------------------------

class DepthwiseParams(ctypes.Structure):
    """csrc/conv2d/depthwise.h's DepthwiseParams (size checked against the C++ one)."""
    _fields_ = [("x", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("grad_out", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("pre", ctypes.c_void_p), ("residual", ctypes.c_void_p),
                ("weight_grad", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("activation", ctypes.c_int),
                ("batch", ctypes.c_int64), ("height", ctypes.c_int64), ("width", ctypes.c_int64),
                ("channels", ctypes.c_int64), ("kernel_h", ctypes.c_int64),
                ("kernel_w", ctypes.c_int64), ("out_h", ctypes.c_int64),
                ("out_w", ctypes.c_int64),
                ("stride_h", ctypes.c_int), ("stride_w", ctypes.c_int),
                ("pad_h", ctypes.c_int), ("pad_w", ctypes.c_int),
                ("dilation_h", ctypes.c_int), ("dilation_w", ctypes.c_int),
                ("split_pixels", ctypes.c_int64)]


DEPTHWISE_CASES = {
    # name: (N, C, H, W, R, S, stride, padding, dilation)
    "3x3_s1": (2, 16, 9, 9, 3, 3, (1, 1), (1, 1), (1, 1)),
    "3x3_s2_odd13": (1, 24, 13, 13, 3, 3, (2, 2), (1, 1), (1, 1)),
    "7x7_dilation2": (1, 8, 17, 15, 7, 7, (1, 1), (6, 6), (2, 2)),
    "5x3_s21": (1, 8, 10, 9, 5, 3, (2, 1), (2, 1), (1, 1)),
}


def depthwise_problem(case, dtype):
    n, c, h, w, r, s, stride, padding, dilation = DEPTHWISE_CASES[case]
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, r, s) / (r * s) ** 0.5).to(dtype)
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    weight_rsc = weight[:, 0].permute(1, 2, 0).contiguous()  # (R, S, C), as the op passes it
    params = DepthwiseParams(x=x.data_ptr(), weight=weight_rsc.data_ptr(), batch=n, height=h,
                             width=w, channels=c, kernel_h=r, kernel_w=s, out_h=p, out_w=q,
                             stride_h=stride[0], stride_w=stride[1], pad_h=padding[0],
                             pad_w=padding[1], dilation_h=dilation[0], dilation_w=dilation[1])
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    return x, weight, weight_rsc, params, geometry


def run_depthwise(pass_index, dtype, params, splits=1):
    lib = emulated("conv2d")
    assert lib.depthwise_params_size() == ctypes.sizeof(DepthwiseParams)
    error = ctypes.create_string_buffer(512)
    status = lib.emulate_depthwise(pass_index, DTYPE_CODES[dtype], ctypes.byref(params), splits,
                                   error, len(error))
    assert status == 0, error.value.decode()


@pytest.mark.parametrize("activation,residual", [(None, False), ("silu", False),
                                                 ("silu", True), ("hardswish", False)],
                         ids=["None", "silu", "residual_silu", "hardswish"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_depthwise_kernels(case, dtype, activation, residual):
    x, weight, weight_rsc, params, geometry = depthwise_problem(case, dtype)
    n, c = x.shape[:2]
    p, q = params.out_h, params.out_w
    bias = torch.randn(c)
    out, out_storage = nhwc((n, c, p, q), dtype)
    pre, pre_storage = nhwc((n, c, p, q), dtype)
    params.out, params.pre, params.bias = out.data_ptr(), pre.data_ptr(), bias.data_ptr()
    params.activation = ACTIVATIONS[activation]
    shortcut = torch.zeros(n, c, p, q)
    if residual:  # added before the activation
        shortcut = torch.randn(n, c, p, q).to(dtype).contiguous(
            memory_format=torch.channels_last)
        params.residual = shortcut.data_ptr()
    run_depthwise(0, dtype, params)
    for storage, name in ((out_storage, "out"), (pre_storage, "pre")):
        assert_guards_untouched(storage, name)
    ref_pre = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(),
                                         **geometry) + shortcut.double()
    base_pre = torch.nn.functional.conv2d(x.float(), weight.float(), bias,
                                          **geometry) + shortcut.float()
    assert_close_to_reference(pre, ref_pre, base_pre.to(dtype), name="pre-activation")
    assert_close_to_reference(out, activate(ref_pre, activation),
                              activate(base_pre, activation).to(dtype))

    grad = torch.randn(n, c, p, q).to(dtype).contiguous(memory_format=torch.channels_last)
    dx, dx_storage = nhwc(tuple(x.shape), dtype)
    params.grad_out, params.out = grad.data_ptr(), dx.data_ptr()
    run_depthwise(1, dtype, params)
    assert_guards_untouched(dx_storage, "dx")

    def dgrad(compute):
        return torch.nn.grad.conv2d_input(x.shape, weight.to(compute), grad.to(compute),
                                          **geometry)
    assert_close_to_reference(dx, dgrad(torch.float64), dgrad(torch.float32).to(dtype),
                              name="dx")

    splits = 3
    params.split_pixels = -(-(n * p * q) // splits)
    partial, partial_storage = guarded_empty((splits, *weight_rsc.shape), torch.float32)
    params.weight_grad = partial.data_ptr()
    run_depthwise(2, dtype, params, splits)
    assert_guards_untouched(partial_storage, "partial")
    dw = partial.sum(0).permute(2, 0, 1)[:, None].to(dtype)  # (C, 1, R, S), as the op returns

    def wgrad(compute):
        return torch.nn.grad.conv2d_weight(x.to(compute), weight.shape, grad.to(compute),
                                           **geometry)
    assert_close_to_reference(dw, wgrad(torch.float64), wgrad(torch.float32).to(dtype),
                              name="dw")


# --- activation backward: csrc/gemm/activation_backward.cuh ------------------------------------

class ActivationBackwardParams(ctypes.Structure):
    """csrc/gemm/activation_backward.h's ActivationBackwardParams (size checked)."""
    _fields_ = [("grad", ctypes.c_void_p), ("pre", ctypes.c_void_p), ("dz", ctypes.c_void_p),
                ("bias_partials", ctypes.c_void_p), ("m", ctypes.c_int64), ("n", ctypes.c_int64),
                ("grad_row_stride", ctypes.c_int64), ("grad_col_stride", ctypes.c_int64),
                ("pre_row_stride", ctypes.c_int64), ("pre_col_stride", ctypes.c_int64),
                ("activation", ctypes.c_int), ("dz_bf16", ctypes.c_bool),
                ("grad_fp32", ctypes.c_bool), ("pre_fp32", ctypes.c_bool)]


ACTIVATION_CODES = {name: code for name, code in ACTIVATIONS.items() if name}  # matmul.h
ROWS_PER_BLOCK = 128  # kActivationBackwardRows
ACTIVATION_BACKWARD_CASES = {
    # name: (m, n, dz dtype, grad dtype, activation, layout, bias, columns per thread[,
    # pre dtype: default dz's])
    # Three row blocks (the last of 44 rows), two column strips (the second 8 wide).
    "bf16_gelu_row_and_column_tails": (300, 264, torch.bfloat16, torch.bfloat16, "gelu",
                                       "contiguous", True, 8),
    "fp16_silu_fp32_grad": (130, 72, torch.float16, torch.float32, "silu", "contiguous", True, 8),
    "bf16_relu_odd_n": (50, 37, torch.bfloat16, torch.bfloat16, "relu", "contiguous", True, 1),
    "fp16_gelu_tanh_transposed": (129, 40, torch.float16, torch.float16, "gelu_tanh",
                                  "transposed", True, 1),
    "bf16_gelu_padded_rows_fp32_grad": (17, 24, torch.bfloat16, torch.float32, "gelu", "padded",
                                        True, 8),
    # 16-byte aligned rows, but n not a multiple of 8: a vector would cross the row's end.
    "bf16_relu_padded_rows_n_20": (33, 20, torch.bfloat16, torch.bfloat16, "relu", "padded", True,
                                   1),
    "fp16_relu_no_bias": (140, 16, torch.float16, torch.float16, "relu", "contiguous", False, 8),
    # An fp32 pre-activation (a gemm with an fp32 output keeps it so) and fp32 grad.
    "bf16_gelu_fp32_pre": (300, 264, torch.bfloat16, torch.float32, "gelu", "contiguous", True,
                           8, torch.float32),
    "fp16_silu_fp32_pre_padded_rows": (17, 24, torch.float16, torch.float32, "silu", "padded",
                                       True, 8, torch.float32),
    "bf16_gelu_tanh_fp32_pre_transposed": (129, 40, torch.bfloat16, torch.float32, "gelu_tanh",
                                           "transposed", True, 1, torch.float32),
    "bf16_relu6": (140, 16, torch.bfloat16, torch.bfloat16, "relu6", "contiguous", True, 8),
    "fp16_hardswish_transposed": (129, 40, torch.float16, torch.float32, "hardswish",
                                  "transposed", True, 1),
    "bf16_sigmoid": (140, 16, torch.bfloat16, torch.bfloat16, "sigmoid", "contiguous", True, 8),
    "fp16_hardsigmoid_transposed": (129, 40, torch.float16, torch.float32, "hardsigmoid",
                                    "transposed", True, 1),
}


def strided_in_nan_storage(x, layout):
    """x laid out as asked inside NaN-filled storage (padding NaN too): a read outside x
    makes a NaN in the output."""
    m, n = x.shape
    if layout == "transposed":
        storage = torch.full((n + 3, m + 5), float("nan"), dtype=x.dtype)
        view = storage[1:n + 1, 2:m + 2].t()
    elif layout == "padded":  # rows a multiple of 8 elements apart, with NaN after each
        storage = torch.full((m + 2, -(-n // 8) * 8 + 8), float("nan"), dtype=x.dtype)
        view = storage[1:m + 1, :n]
    else:
        storage = torch.full((m * n + 2 * GUARD,), float("nan"), dtype=x.dtype)
        view = storage[GUARD:GUARD + m * n].view(m, n)
    return view.copy_(x)


@pytest.mark.parametrize("case", list(ACTIVATION_BACKWARD_CASES))
def test_activation_backward_kernels(case):
    """dz within one rounding of the float64 product (computed in fp32 from the same inputs),
    and each block's bias partial sums those of its own rows."""
    check_activation_backward(case)


@pytest.mark.parametrize("case", [c for c in ACTIVATION_BACKWARD_CASES
                                  if "relu" in c or "hardsigmoid" in c])
def test_activation_backward_at_a_nan_pre_activation(case):
    """At a NaN pre-activation, relu' is 1, as torch's (threshold_backward tests the output,
    NaN, for <= 0): dz there is the gradient, not 0; relu6' and hardsigmoid' are 0 there, as
    torch's hardtanh_backward and hardsigmoid_backward have them."""
    check_activation_backward(case, pre_nan=True)


def check_activation_backward(case, pre_nan=False):
    m, n, dtype, grad_dtype, activation, layout, bias, width, *wider_pre = (
        ACTIVATION_BACKWARD_CASES[case])
    pre_dtype = wider_pre[0] if wider_pre else dtype
    lib = emulated("activation_backward")
    assert lib.activation_backward_params_size() == ctypes.sizeof(ActivationBackwardParams)
    pre = torch.randn(m, n) * 2
    if pre_nan:
        pre[m // 2, n // 2:] = float("nan")
    pre = strided_in_nan_storage(pre.to(pre_dtype), layout)
    grad = strided_in_nan_storage(torch.randn(m, n).to(grad_dtype), layout)
    ref, torch_fp32 = (testing.activation_grad_reference(activation, pre, grad, dtype)
                       for dtype in (torch.float64, torch.float32))
    dz, dz_storage = guarded_empty((m, n), dtype)
    row_blocks = -(-m // ROWS_PER_BLOCK)
    partials, partials_storage = guarded_empty((row_blocks, n), torch.float32)
    p = ActivationBackwardParams(
        grad=grad.data_ptr(), pre=pre.data_ptr(), dz=dz.data_ptr(),
        bias_partials=partials.data_ptr() if bias else None, m=m, n=n,
        grad_row_stride=grad.stride(0), grad_col_stride=grad.stride(1),
        pre_row_stride=pre.stride(0), pre_col_stride=pre.stride(1),
        activation=ACTIVATION_CODES[activation], dz_bf16=dtype == torch.bfloat16,
        grad_fp32=grad_dtype == torch.float32, pre_fp32=pre_dtype == torch.float32)
    vector_width = ctypes.c_int()
    error = ctypes.create_string_buffer(512)
    status = lib.emulate_activation_backward(ctypes.byref(p), ctypes.byref(vector_width), error,
                                             len(error))
    assert status == 0, error.value.decode()
    assert vector_width.value == width
    assert_guards_untouched(dz_storage, "dz")
    assert_guards_untouched(partials_storage, "bias partials")
    testing.assert_pointwise_close(dz, ref, torch_fp32, name="dz")
    if not bias:
        assert partials.isnan().all(), "bias partials written without a bias gradient"
        return
    for r in range(row_blocks):
        rows = ref[r * ROWS_PER_BLOCK:(r + 1) * ROWS_PER_BLOCK]
        testing.assert_fp32_close(partials[r], rows.sum(0), name=f"bias partials {r}")


# --- whole sectors: the global-memory side of the meter -----------------------------------------

def _matmul_full_tiles(layout, hopper):
    a = matmul_operand(256, 128, torch.bfloat16, layout[0])
    b = matmul_operand(128, 256, torch.bfloat16, layout[1])
    c, _ = run_matmul(a, b, hopper=hopper)
    assert c is not None, "the wgmma kernel did not take the operands"


def _attention_full_tiles(head_dim, hopper):
    q, k, v = attention_inputs(1, 2, 2, 128, 128, head_dim, torch.bfloat16)
    out, lse = run_attention_fwd(q, k, v, False, head_dim ** -0.5, hopper=hopper)
    run_attention_bwd(torch.randn(out.shape).to(q.dtype), q, k, v, out, lse, False,
                      head_dim ** -0.5, hopper=hopper)


def _scaled_gemm_full_tiles():
    a, b, scale_a, scale_b = fp8_operands(128, 256, 256, torch.float8_e4m3fn,
                                          torch.float8_e4m3fn, "row", 0)
    run_scaled_gemm(a, b, scale_a, scale_b, None, torch.bfloat16, "row")


# Aligned shapes whose tiles lie wholly inside the operands, each kernel's cp.async path
# (the TMA kernels' copies are the hardware's); conv2d through its tests (results checked).
FULL_TILE_CASES = {
    **{f"matmul_{kernel}_{name}": functools.partial(_matmul_full_tiles, layout, hopper)
       for kernel, hopper in (("sm80", False), ("sm90a", True))
       for layout, name in zip(LAYOUTS, ("a_rm-b_rm", "a_rm-b_cm", "a_cm-b_rm", "a_cm-b_cm"))},
    **{f"attention_sm80_d{d}": functools.partial(_attention_full_tiles, d, False)
       for d in (64, 128, 256)},
    "attention_sm90a_d128": functools.partial(_attention_full_tiles, 128, True),
    **{f"conv2d_{kernel}_{name}_{case}": functools.partial(test, case, torch.bfloat16,
                                                           *extra, kernel)
       for kernel in ("sm80", "sm90a")
       for name, test, extra in (("forward", test_conv2d_forward_kernel, (None, False)),
                                 ("dgrad", test_conv2d_dgrad_kernel, ()),
                                 ("wgrad", test_conv2d_wgrad_kernel, (1,)))
       for case in ("3x3_64_channels", "1x1_s2_128_channels")},
    "scaled_gemm_sm90a_row": _scaled_gemm_full_tiles,
}


@pytest.mark.parametrize("case", list(FULL_TILE_CASES))
def test_full_tiles_read_whole_sectors(case):
    """Each warp-wide cp.async of a full tile reads whole 32-byte sectors only: no sector is
    fetched for part of its bytes (what a misaligned or strided copy layout would cost)."""
    memory_traffic()
    FULL_TILE_CASES[case]()
    traffic = memory_traffic()
    traffic.assert_conflict_free()
    assert traffic.cp_async_instructions > 0, "the meter saw no copies"
    if "sm80" in case:
        assert traffic.ldmatrix_phases > 0, "the meter saw no ldmatrix"
    assert traffic.cp_async_sectors * 32 == traffic.cp_async_bytes, traffic

"""What "correct" means for tilesmith's kernels (GUIDE §3), as functions the tests and the
benchmarks share: float64 references, error ratios, SQNR, poisoned outputs, sample inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

# float32 budgets: IEEE arithmetic, and TF32 (10-bit mantissa inputs) when allowed.
FP32_IEEE_RTOL = 1e-5
FP32_TF32_RTOL = 5e-4


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in ``out`` gives inf."""
    out64 = out.detach().to(torch.float64)
    ref64 = ref.detach().to(device=out64.device, dtype=torch.float64)
    if out64.numel() == 0:
        return 0.0
    if not torch.isfinite(out64).all():
        return float("inf")
    ref_norm = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / ref_norm if ref_norm > 0 else diff


def ulp(dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` at 1.0."""
    return torch.finfo(dtype).eps


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
                              *, name: str = "output", factor: float = 2.0) -> None:
    """The low-precision rule: ``out``'s error against the float64 ``ref`` is at most
    ``factor`` times the error of ``baseline`` (PyTorch's own implementation at the same
    precision), with a floor of one ulp of the dtype (relative), for cases where PyTorch
    happens to be (nearly) exact."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == baseline.dtype, f"{name}: dtype {out.dtype} != {baseline.dtype}"
    err = rel_error(out, ref)
    base = rel_error(baseline, ref)
    allowed = max(factor * base, ulp(out.dtype))
    assert err <= allowed, (f"{name}: relative error {err:.3e} exceeds {allowed:.3e} "
                            f"({factor}x PyTorch's {base:.3e}, dtype {out.dtype})")


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor, *, tf32: bool = False,
                      name: str = "output") -> None:
    rtol = FP32_TF32_RTOL if tf32 else FP32_IEEE_RTOL
    err = rel_error(out, ref)
    assert err <= rtol, f"{name}: relative error {err:.3e} exceeds {rtol:.0e}"


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``out`` against ``ref`` in dB (float64)."""
    ref64 = ref.detach().double()
    noise = (out.detach().double().to(ref64.device) - ref64).norm()
    if noise == 0:
        return float("inf")
    return (20 * torch.log10(ref64.norm() / noise)).item()


@contextlib.contextmanager
def poison_outputs():
    """Inside this block every tilesmith op allocates its outputs NaN-filled (Python and
    C++ alike, through the TILESMITH_POISON_OUTPUTS variable), so an element that a kernel
    does not write shows up as NaN instead of as whatever the allocator had there."""
    previous = os.environ.get("TILESMITH_POISON_OUTPUTS")
    os.environ["TILESMITH_POISON_OUTPUTS"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TILESMITH_POISON_OUTPUTS"]
        else:
            os.environ["TILESMITH_POISON_OUTPUTS"] = previous


@dataclasses.dataclass
class SampleInput:
    name: str
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def _rand(shape, dtype, device, generator):
    return torch.randn(shape, dtype=torch.float32, device="cpu", generator=generator).to(
        device=device, dtype=dtype)


def matmul_sample_inputs(device, dtype, *, large: bool = False, seed: int = 0
                         ) -> list[SampleInput]:
    """One list for every matmul test: odd sizes, batch 1, transposed and offset views,
    broadcast batches, 1-D operands, zero-size dimensions. ``large`` adds GPU-sized shapes
    (sizes past 1000 stay small in the other dimensions so the CPU interpreter copes)."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)

    def r(*shape):
        return _rand(shape, dtype, device, g)

    samples = [
        SampleInput("1x1x1", (r(1, 1), r(1, 1))),
        SampleInput("17x17x17", (r(17, 17), r(17, 17))),
        SampleInput("33x127x65", (r(33, 127), r(127, 65))),
        SampleInput("row_vector_m1", (r(1, 40), r(40, 70))),
        SampleInput("k1000_skinny", (r(5, 1000), r(1000, 9))),
        SampleInput("n1000_skinny", (r(3, 20), r(20, 1000))),
        SampleInput("a_transposed", (r(48, 40).t(), r(48, 24))),
        SampleInput("b_transposed", (r(40, 48), r(24, 48).t())),
        SampleInput("both_transposed", (r(33, 31).t(), r(19, 33).t())),
        # Storage offsets and row strides that are not the row length.
        SampleInput("offset_slices", (r(50, 70)[3:40, 5:50], r(60, 40)[7:52, 2:35])),
        SampleInput("odd_offset_column", (r(20, 33)[:, 1:], r(40, 17)[1:33])),
        SampleInput("batched_3d", (r(3, 17, 24), r(3, 24, 19))),
        SampleInput("batch1_3d", (r(1, 31, 40), r(1, 40, 23))),
        SampleInput("batched_transposed", (r(2, 24, 30).transpose(1, 2), r(2, 20, 24).transpose(1, 2))),
        SampleInput("broadcast_batch_b2d", (r(2, 3, 9, 16), r(16, 11))),
        SampleInput("broadcast_batch_dims", (r(2, 1, 9, 16), r(3, 16, 11))),
        SampleInput("broadcast_a2d", (r(9, 16), r(4, 16, 11))),
        SampleInput("vector_matrix", (r(24,), r(24, 13))),
        SampleInput("matrix_vector", (r(13, 24), r(24,))),
        SampleInput("batched_matrix_vector", (r(2, 13, 24), r(24,))),
        # Tiny ones, for gradcheck (a forward call per input element, twice).
        SampleInput("tiny_3x5x4", (r(3, 5), r(5, 4))),
        SampleInput("tiny_transposed", (r(5, 3).t(), r(4, 5).t())),
        SampleInput("tiny_broadcast", (r(2, 1, 3, 4), r(3, 4, 2))),
        SampleInput("tiny_batched_vector", (r(2, 3, 4), r(4,))),
        SampleInput("zero_m", (r(0, 8), r(8, 5))),
        SampleInput("zero_n", (r(7, 8), r(8, 0))),
        SampleInput("zero_k", (r(7, 0), r(0, 5))),
        SampleInput("zero_batch", (r(0, 4, 8), r(0, 8, 5))),
    ]
    if large:
        samples += [
            SampleInput("1000x1024x1000", (r(1000, 1024), r(1024, 1000))),
            SampleInput("1024_square", (r(1024, 1024), r(1024, 1024))),
            SampleInput("llm_m16", (r(16, 4096), r(4096, 4096))),
            SampleInput("batched_large", (r(8, 257, 512), r(8, 512, 383))),
            SampleInput("transposed_large", (r(1024, 777).t(), r(1024, 513))),
        ]
    return samples

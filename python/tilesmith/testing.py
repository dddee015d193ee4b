"""What "correct" means for tilesmith's kernels (GUIDE §3), as functions the tests and the
benchmarks share: float64 references, error ratios, SQNR, poisoned outputs, sample inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
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


# A reference that is exactly zero in exact arithmetic (the query gradient of attention over
# a single key, say) comes out of float64 as ~1e-16 noise and out of any lower precision as
# rounding noise of the O(1..10)-sized terms that cancel: relative error means nothing there.
# Such outputs must instead stay within this many ulps (at 1.0) of zero, element-wise.
ZERO_REFERENCE_ULPS = 64


def _exactly_zero(ref: torch.Tensor) -> bool:
    return ref.numel() > 0 and ref.detach().abs().max().item() < 1e-12


def _assert_near_zero(out: torch.Tensor, name: str) -> None:
    bound = ZERO_REFERENCE_ULPS * ulp(out.dtype)
    worst = out.detach().double().abs().max().item()
    assert worst <= bound, f"{name}: reference is 0, got |max| {worst:.3e} > {bound:.3e}"


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
                              *, name: str = "output", factor: float = 2.0) -> None:
    """The low-precision rule: ``out``'s error against the float64 ``ref`` is at most
    ``factor`` times the error of ``baseline`` (PyTorch's own implementation at the same
    precision), with a floor of one ulp of the dtype (relative), for cases where PyTorch
    happens to be (nearly) exact. (Exactly-zero references: see ZERO_REFERENCE_ULPS.)"""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == baseline.dtype, f"{name}: dtype {out.dtype} != {baseline.dtype}"
    if _exactly_zero(ref):
        return _assert_near_zero(out, name)
    err = rel_error(out, ref)
    base = rel_error(baseline, ref)
    if not math.isfinite(base):
        # PyTorch's own result has a NaN or inf where the reference is finite (older versions
        # do for fully masked attention rows): its error there would allow anything, so the
        # bound comes from its finite entries only.
        finite = torch.isfinite(baseline)
        base = rel_error(baseline[finite], ref[finite]) if finite.any() else 0.0
    allowed = max(factor * base, ulp(out.dtype))
    assert err <= allowed, (f"{name}: relative error {err:.3e} exceeds {allowed:.3e} "
                            f"({factor}x PyTorch's {base:.3e}, dtype {out.dtype})")


def activation_grad_reference(activation: str, pre: torch.Tensor, grad: torch.Tensor,
                              dtype: torch.dtype) -> torch.Tensor:
    """grad * act'(pre) (any epilogue activation: "relu", "gelu", "gelu_tanh", "silu",
    "relu6", "hardswish", "sigmoid", "hardsigmoid") by autograd through PyTorch's own
    activation, computed in ``dtype``."""
    functions = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
                 "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
                 "silu": torch.nn.functional.silu, "relu6": torch.nn.functional.relu6,
                 "hardswish": torch.nn.functional.hardswish, "sigmoid": torch.sigmoid,
                 "hardsigmoid": torch.nn.functional.hardsigmoid}
    z = pre.detach().to(dtype).requires_grad_()
    return torch.autograd.grad(functions[activation](z), z, grad.to(dtype))[0]


def assert_pointwise_close(out: torch.Tensor, ref: torch.Tensor, fp32_baseline: torch.Tensor,
                           *, name: str = "output") -> None:
    """The rule for elementwise kernels that compute in fp32 and round once to ``out``'s
    dtype, checked element by element (a norm would hide a few wrong elements): each within
    one rounding (eps relative) of the float64 ``ref``, plus twice the largest absolute
    error of ``fp32_baseline`` (PyTorch's own evaluation in fp32, for the conditioning of
    the formula: 1 + erf or 1 - tanh^2 cancel at large |x|)."""
    ref64 = ref.detach().double()
    err = (out.detach().double().to(ref64.device) - ref64).abs()
    slack = 2 * float((fp32_baseline.detach().double().to(ref64.device) - ref64).abs().max())
    allowed = torch.finfo(out.dtype).eps * ref64.abs() + slack
    bad = ~(err <= allowed)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {out.numel()} elements off, e.g. "
                           f"{out.flatten()[bad.flatten()][:3].tolist()} for "
                           f"{ref64.flatten()[bad.flatten()][:3].tolist()}")


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor, *, tf32: bool = False,
                      name: str = "output") -> None:
    if _exactly_zero(ref):
        return _assert_near_zero(out, name)
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
        SampleInput("batched_transposed", (r(2, 24, 30).transpose(1, 2),
                                           r(2, 20, 24).transpose(1, 2))),
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
        SampleInput("zero_k_batched_b2d", (r(2, 7, 0), r(0, 5))),
        SampleInput("zero_k_broadcast_batch", (r(2, 1, 3, 0), r(3, 0, 4))),
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


def grad_views(tensors):
    """Each tensor rebuilt as the same view (shape, strides, storage offset) of a fresh leaf
    that requires grad, so gradient tests differentiate through the layouts the forward
    tests use. Non-tensors and non-float tensors pass through."""
    views = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            views.append(t)
            continue
        base = t._base if t._base is not None else t
        leaf = base.detach().clone().requires_grad_(True)
        views.append(leaf.as_strided(t.shape, t.stride(), t.storage_offset()))
    return views


def attention_sample_inputs(device, dtype, *, large: bool = False, seed: int = 0
                            ) -> list[SampleInput]:
    """One list for every attention test: lengths 1..1023, causal with seq_q < seq_k and
    seq_q > seq_k, grouped-query heads (with masks, and decoding), head dims 40..256, value
    head dim != query's, boolean and additive masks of every broadcastable shape and as
    views (transposed, sliced, expanded), a fully masked row, strided views, ranks 3 and 5
    and leading dimensions (batch, heads) that broadcast.
    Each sample's args are (query, key, value); kwargs are scaled_dot_product_attention's."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)

    def r(*shape):
        return _rand(shape, dtype, device, g)

    def qkv(b, h, hk, sq, sk, d, dv=None):
        return r(b, h, sq, d), r(b, hk, sk, d), r(b, hk, sk, dv or d)

    samples = [
        SampleInput("basic_b2h3s17", qkv(2, 3, 3, 17, 17, 64)),
        SampleInput("len1", qkv(1, 2, 2, 1, 1, 64)),
        SampleInput("len113_d40", qkv(1, 2, 2, 113, 113, 40)),
        SampleInput("len1023", qkv(1, 1, 1, 1023, 1023, 64)),
        SampleInput("cross_sq17_sk50", qkv(2, 2, 2, 17, 50, 64)),
        SampleInput("causal_square_113", qkv(1, 2, 2, 113, 113, 64), {"is_causal": True}),
        SampleInput("causal_sq17_lt_sk50", qkv(2, 2, 2, 17, 50, 64), {"is_causal": True}),
        SampleInput("causal_sq50_gt_sk17", qkv(2, 2, 2, 50, 17, 64), {"is_causal": True}),
        SampleInput("gqa_kv1", qkv(1, 8, 1, 33, 33, 32), {"enable_gqa": True}),
        SampleInput("gqa_kv2_causal", qkv(1, 8, 2, 33, 33, 64),
                    {"enable_gqa": True, "is_causal": True}),
        SampleInput("gqa_kv8", qkv(1, 8, 8, 33, 33, 32), {"enable_gqa": True}),
        SampleInput("d40", qkv(1, 2, 2, 33, 33, 40)),
        SampleInput("d64", qkv(1, 2, 2, 33, 33, 64)),
        SampleInput("d80", qkv(1, 2, 2, 33, 33, 80)),
        SampleInput("d128", qkv(1, 2, 2, 33, 33, 128)),
        SampleInput("d256", qkv(1, 2, 2, 33, 33, 256)),
        SampleInput("dv_differs", qkv(2, 2, 2, 20, 24, 64, dv=32)),
        SampleInput("custom_scale", qkv(1, 2, 2, 20, 20, 32), {"scale": 0.3}),
        SampleInput("empty_batch", qkv(0, 2, 2, 8, 8, 32)),
        SampleInput("no_heads", qkv(2, 0, 0, 8, 8, 32)),
        # Empty query/key head dims: every score is 0, each row averages the values.
        SampleInput("no_query_key_dims", qkv(2, 2, 2, 5, 7, 0, dv=16)),
    ]
    # A (batch, seq, heads, dim) projection viewed as (batch, heads, seq, dim), and slices.
    q = r(2, 19, 3, 48).transpose(1, 2)
    kv = r(2, 3, 30, 96)
    samples.append(SampleInput("strided_views", (q, kv[..., :48], kv[..., 48:])))

    b, h, sq, sk = 2, 3, 21, 26
    mask_shapes = {"sq_sk": (sq, sk), "1_sk": (1, sk), "b_1_sq_sk": (b, 1, sq, sk),
                   "1_h_sq_sk": (1, h, sq, sk), "b_h_sq_sk": (b, h, sq, sk),
                   "b_1_1_sk": (b, 1, 1, sk), "h_sq_sk": (h, sq, sk)}
    for name, shape in mask_shapes.items():
        keep = torch.rand(shape, generator=g) > 0.3
        samples.append(SampleInput(f"bool_mask_{name}", qkv(b, h, h, sq, sk, 32),
                                   {"attn_mask": keep.to(device)}))
        samples.append(SampleInput(f"float_mask_{name}", qkv(b, h, h, sq, sk, 32),
                                   {"attn_mask": r(*shape)}))
    # Float masks as views: their gradients are written through strides of their own.
    samples.append(SampleInput("float_mask_transposed", qkv(b, h, h, sq, sk, 32),
                               {"attn_mask": r(sk, sq).t()}))
    samples.append(SampleInput("float_mask_sliced", qkv(b, h, h, sq, sk, 32),
                               {"attn_mask": r(b, h, sq, 2 * sk)[..., 1::2]}))
    samples.append(SampleInput("float_mask_expanded", qkv(b, h, h, sq, sk, 32),
                               {"attn_mask": r(1, h, sq, sk).expand(b, h, sq, sk)}))
    keep = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    keep[:, :, 4] = False  # query row 4 sees no key at all
    samples.append(SampleInput("fully_masked_row_bool", qkv(b, h, h, sq, sk, 32),
                               {"attn_mask": keep.to(device)}))
    bias = r(1, h, sq, sk)
    bias[:, :, 7] = float("-inf")
    samples.append(SampleInput("fully_masked_row_float", qkv(b, h, h, sq, sk, 32),
                               {"attn_mask": bias}))
    # Grouped-query calls with short queries (which the Triton forward packs per kv head): a
    # decoding step, a float mask per query head (with its gradient) and a bool mask per
    # batch entry with a fully masked row.
    samples.append(SampleInput("gqa_decode", qkv(2, 8, 2, 1, 70, 64), {"enable_gqa": True}))
    samples.append(SampleInput("gqa_float_mask_per_head", qkv(2, 6, 2, 9, 30, 32),
                               {"enable_gqa": True, "attn_mask": r(1, 6, 9, 30)}))
    keep = torch.rand(2, 1, 9, 30, generator=g) > 0.3
    keep[:, :, 4] = False
    samples.append(SampleInput("gqa_bool_mask_masked_row", qkv(2, 4, 1, 9, 30, 32),
                               {"enable_gqa": True, "attn_mask": keep.to(device)}))
    # PyTorch's other ranks and broadcast leading dimensions: (heads, seq, dim) with a
    # (heads, seq_q, seq_k) bias; two batch dimensions, key and value broadcast over the
    # first and a bias over it and the heads; one kv head without enable_gqa; one query head
    # for three kv heads, and key and value broadcast over the batch.
    samples.append(SampleInput("rank3", (r(3, 17, 32), r(3, 20, 32), r(3, 20, 32)),
                               {"attn_mask": r(3, 17, 20)}))
    samples.append(SampleInput("rank5_kv_broadcast", (r(2, 3, 2, 9, 32), r(1, 3, 2, 12, 32),
                                                      r(1, 3, 2, 12, 32)),
                               {"attn_mask": r(3, 1, 9, 12)}))
    samples.append(SampleInput("kv_one_head_broadcast", qkv(2, 4, 1, 9, 12, 32)))
    samples.append(SampleInput("query_one_head_broadcast",
                               (r(2, 1, 9, 32), r(1, 3, 12, 32), r(1, 3, 12, 32))))
    if large:
        samples += [
            SampleInput("large_causal_2k", qkv(2, 8, 8, 2048, 2048, 128), {"is_causal": True}),
            SampleInput("large_gqa_1k", qkv(2, 16, 4, 1024, 1024, 128), {"enable_gqa": True}),
            SampleInput("large_d64_4k", qkv(1, 4, 4, 4096, 4096, 64)),
        ]
    return samples


def varlen_sample_inputs(device, dtype, *, seed: int = 0) -> list[SampleInput]:
    """Packed batches for varlen_attention: args (q, k, v, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k); kwargs: causal."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    samples = []
    cases = [("self_lengths_1_17_5_40", [1, 17, 5, 40], [1, 17, 5, 40], 4, 4, 32, {}),
             ("cross_gqa", [3, 17, 30, 1], [5, 2, 30, 9], 4, 2, 64, {}),
             ("causal_gqa", [3, 17, 30, 1], [5, 2, 30, 9], 4, 2, 64, {"causal": True}),
             # Self-attention over one packing: cu_seqlens_k is cu_seqlens_q, one tensor.
             ("causal_self_one_packing", [7, 1, 20, 0, 12], None, 4, 2, 32, {"causal": True}),
             ("with_empty_sequence", [4, 0, 9], [4, 3, 0], 2, 1, 40, {}),
             # One query token in all (a lone decode step): (heads, 1) row constants.
             ("single_token", [1], [6], 2, 2, 32, {}),
             ("no_heads", [3, 4], [5, 2], 0, 0, 32, {})]
    for name, lens_q, lens_k, h, hk, d, kwargs in cases:
        cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)),
                            dtype=torch.int32).to(device)
        cu_k = cu_q if lens_k is None else torch.tensor(
            [0] + list(itertools.accumulate(lens_k)), dtype=torch.int32).to(device)
        lens_k = lens_q if lens_k is None else lens_k
        q = _rand((sum(lens_q), h, d), dtype, device, g)
        k = _rand((sum(lens_k), hk, d), dtype, device, g)
        v = _rand((sum(lens_k), hk, d), dtype, device, g)
        samples.append(SampleInput(name, (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)),
                                   kwargs))
    return samples



def gemm_sample_inputs(device, dtype, *, large: bool = False, seed: int = 0
                       ) -> list[SampleInput]:
    """One list for every gemm test: each activation with every epilogue piece, the four
    transpose combinations, odd and zero sizes, a wider output dtype, an fp32 bias.
    args: (a, b); kwargs: gemm's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)

    def r(*shape, dt=dtype):
        return _rand(shape, dt, device, g)

    samples = []
    m, k, n = 37, 50, 29
    for act in ("relu", "gelu", "gelu_tanh", "silu", "relu6", "hardswish", "sigmoid",
                "hardsigmoid"):
        samples.append(SampleInput(f"{act}_bias_residual_alpha", (r(m, k), r(k, n)),
                                   {"activation": act, "bias": r(n), "residual": r(m, n),
                                    "alpha": 0.5}))
        samples.append(SampleInput(f"{act}_only", (r(m, k), r(k, n)), {"activation": act}))
    layouts = {"nn": (r(33, 40), r(40, 17)), "nt": (r(33, 40), r(17, 40).t()),
               "tn": (r(40, 33).t(), r(40, 17)), "tt": (r(40, 33).t(), r(17, 40).t())}
    for name, (a, b) in layouts.items():
        samples.append(SampleInput(f"layout_{name}_gelu_bias", (a, b),
                                   {"activation": "gelu", "bias": r(17)}))
    samples += [
        SampleInput("plain", (r(m, k), r(k, n)), {}),
        SampleInput("bias_only", (r(m, k), r(k, n)), {"bias": r(n)}),
        SampleInput("residual_only", (r(m, k), r(k, n)), {"residual": r(m, n)}),
        SampleInput("alpha_only", (r(m, k), r(k, n)), {"alpha": -1.75}),
        SampleInput("fp32_bias", (r(m, k), r(k, n)), {"bias": r(n, dt=torch.float32),
                                                      "activation": "silu"}),
        SampleInput("strided_residual", (r(m, k), r(k, n)),
                    {"residual": r(n, m).t(), "activation": "relu"}),
        # A bias that is a strided view (every other element of a longer vector).
        SampleInput("strided_bias", (r(m, k), r(k, n)),
                    {"bias": r(n, 2)[:, 1], "activation": "gelu"}),
        SampleInput("m1_k1000", (r(1, 1000), r(1000, 17)), {"bias": r(17), "activation": "gelu"}),
        SampleInput("k1", (r(127, 1), r(1, 17)), {"bias": r(17), "activation": "relu"}),
        SampleInput("1x1x1", (r(1, 1), r(1, 1)), {"bias": r(1)}),
        SampleInput("zero_m", (r(0, 8), r(8, 5)), {"bias": r(5), "activation": "gelu"}),
        SampleInput("zero_k", (r(7, 0), r(0, 5)), {"bias": r(5), "activation": "gelu",
                                                   "residual": r(7, 5)}),
    ]
    if dtype != torch.float32:
        samples.append(SampleInput("out_fp32", (r(m, k), r(k, n)),
                                   {"bias": r(n), "activation": "gelu_tanh",
                                    "out_dtype": torch.float32}))
        # An fp32 bias into an fp32 output: its gradient is as accurate as the epilogue's
        # fp32 arithmetic only if the backward's act' reads an fp32 pre-activation.
        samples.append(SampleInput("out_fp32_fp32_bias", (r(m, k), r(k, n)),
                                   {"bias": r(n, dt=torch.float32), "activation": "silu",
                                    "residual": r(m, n, dt=torch.float32),
                                    "out_dtype": torch.float32}))
    if large:
        samples += [
            SampleInput("large_gelu", (r(1024, 4096), r(4096, 1024)),
                        {"bias": r(1024), "activation": "gelu"}),
            SampleInput("large_tt_silu", (r(2048, 777).t(), r(1500, 2048).t()),
                        {"bias": r(1500), "activation": "silu", "residual": r(777, 1500)}),
        ]
    return samples


def conv2d_sample_inputs(device, dtype, *, large: bool = False, seed: int = 0
                         ) -> list[SampleInput]:
    """One list for every conv2d test. args: (input, weight, bias); kwargs: stride, padding,
    dilation, groups, activation, residual. Inputs are NCHW unless the name says
    channels_last; a residual is laid out as the output unless its name says otherwise."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)

    def r(*shape):
        return _rand(shape, dtype, device, g)

    def case(name, n, c, h, w, k, kh, kw=None, groups=1, bias=True, channels_last=False,
             weight_channels_last=False, residual=None, **kwargs):
        x = r(n, c, h, w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = r(k, c // groups, kh, kw or kh)
        if weight_channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        if bias == "strided":  # every other element of a longer vector
            bias_values = r(k, 2)[:, 1]
        else:
            bias_values = r(k) if bias else None
        if residual is not None:  # "same" or "other": the output's memory format or not
            geometry = {key: kwargs[key] for key in ("stride", "padding", "dilation")
                        if key in kwargs}
            shape = torch.nn.functional.conv2d(x.to("meta"), weight.to("meta"),
                                               groups=groups, **geometry).shape
            same = residual == "same"
            kwargs["residual"] = r(*shape).contiguous(
                memory_format=torch.channels_last
                if (channels_last or weight_channels_last) == same else torch.contiguous_format)
        return SampleInput(name, (x, weight, bias_values), dict(kwargs, groups=groups))

    samples = [
        case("k1_c17", 2, 17, 7, 7, 8, 1),
        case("k3_pad1", 2, 3, 13, 13, 16, 3, padding=1),
        case("k3_stride2", 1, 8, 13, 13, 8, 3, stride=2, padding=1),
        case("k2_stride3_empty_phases", 2, 8, 4, 2, 8, 2, stride=3, padding=1),
        case("k5_valid", 2, 4, 13, 11, 6, 5, padding="valid"),
        case("k7_stride2_pad3", 1, 3, 33, 33, 8, 7, stride=2, padding=3),
        case("k3_same", 2, 5, 13, 7, 4, 3, padding="same"),
        case("k3_dilation2", 1, 4, 13, 13, 4, 3, dilation=2, padding=2),
        case("k3_same_dilation2", 1, 4, 7, 13, 5, 3, dilation=2, padding="same"),
        # Even kernel extents: "same" pads one more after than before.
        case("k2_same_even", 2, 4, 7, 9, 6, 2, padding="same"),
        case("k2_same_dilation3", 1, 3, 9, 8, 4, 2, dilation=3, padding="same"),
        case("k4x3_same_gelu_channels_last", 1, 8, 11, 9, 16, 4, kw=3, padding="same",
             activation="gelu", channels_last=True),
        case("groups2", 2, 8, 13, 13, 6, 3, groups=2, padding=1),
        case("depthwise", 2, 8, 13, 13, 8, 3, groups=8, padding=1),
        case("depthwise_stride2", 1, 6, 13, 13, 6, 3, groups=6, stride=2, padding=1),
        case("channel_multiplier2", 1, 6, 13, 11, 12, 3, groups=6, padding=1),
        case("asymmetric_kernel", 1, 4, 13, 13, 4, 3, kw=1, padding=(1, 0)),
        case("no_bias", 2, 4, 7, 7, 4, 3, bias=False, padding=1),
        case("batch1_c3", 1, 3, 33, 33, 17, 3, padding=1),
        case("channels_last_k3", 2, 17, 13, 13, 16, 3, channels_last=True, padding=1),
        case("channels_last_k1_stride2", 2, 16, 13, 13, 32, 1, channels_last=True, stride=2),
        case("relu", 2, 8, 13, 13, 8, 3, padding=1, activation="relu"),
        case("gelu_channels_last", 2, 8, 13, 13, 8, 3, padding=1, activation="gelu",
             channels_last=True),
        case("silu_stride2", 1, 8, 13, 13, 8, 3, stride=2, padding=1, activation="silu"),
        case("empty_batch", 0, 4, 7, 7, 4, 3, padding=1),
        case("strided_bias", 2, 4, 7, 7, 6, 3, padding=1, bias="strided", activation="relu"),
        case("depthwise_strided_bias", 1, 8, 7, 7, 8, 3, groups=8, padding=1, bias="strided",
             channels_last=True),
        case("pointwise_strided_bias_channels_last", 2, 16, 5, 7, 8, 1, bias="strided",
             channels_last=True),
        # Channel and filter counts the cuda kernels take unfilled (multiples of 8).
        case("c16_k24_k5_dilation2", 1, 16, 13, 11, 24, 5, dilation=2, padding=3),
        case("c8_batch1_odd33_channels_last", 1, 8, 33, 33, 16, 3, padding=1,
             channels_last=True),
        # 1x1, stride 1, no padding: the cuda backend runs these on its matmul kernels.
        case("pointwise_c16_k24_relu", 2, 16, 7, 9, 24, 1, activation="relu"),
        # 1292 pixels: the cuda wgrad runs one full split of 704 and a shorter last one.
        case("pointwise_c24_k8_gelu_no_bias_channels_last", 4, 24, 19, 17, 8, 1, bias=False,
             activation="gelu", channels_last=True),
        case("groups2_c16_k32_stride2", 1, 16, 13, 13, 32, 3, groups=2, stride=2, padding=1,
             channels_last=True),
        case("depthwise_c16_k5_stride2_silu", 2, 16, 13, 11, 16, 5, groups=16, stride=2,
             padding=2, activation="silu", channels_last=True),
        # MobileNets' activations (ReLU6 in v2, Hardswish in v3).
        case("relu6_c16_k24_channels_last", 2, 16, 9, 9, 24, 3, padding=1,
             activation="relu6", channels_last=True),
        case("hardswish_depthwise_c16", 2, 16, 9, 11, 16, 3, groups=16, padding=1,
             activation="hardswish"),
        case("hardswish_pointwise_c16_k24_channels_last", 2, 16, 7, 9, 24, 1,
             activation="hardswish", channels_last=True),
        # Squeeze-and-excitation gates: a 1x1 convolution of pooled (N, C, 1, 1) features
        # (Hardsigmoid in MobileNetV3, Sigmoid in EfficientNet); and a 3x3 one.
        case("hardsigmoid_pooled_c24_k16_channels_last", 3, 24, 1, 1, 16, 1,
             activation="hardsigmoid", channels_last=True),
        case("sigmoid_c8_k16", 2, 8, 9, 7, 16, 3, padding=1, activation="sigmoid"),
        # A residual added before the activation (a ResNet block's shortcut), on every path.
        case("residual_relu", 2, 8, 13, 13, 8, 3, padding=1, activation="relu",
             residual="same"),
        case("residual_nchw_gelu_stride2_channels_last", 1, 16, 13, 11, 24, 3, stride=2,
             padding=1, activation="gelu", channels_last=True, residual="other"),
        case("residual_pointwise_relu_channels_last", 2, 16, 7, 9, 24, 1, activation="relu",
             channels_last=True, residual="same"),
        case("residual_pointwise_channels_last_nchw", 2, 16, 5, 7, 8, 1, channels_last=True,
             residual="other"),
        case("residual_depthwise_silu_channels_last", 2, 16, 9, 11, 16, 3, groups=16,
             padding=1, activation="silu", channels_last=True, residual="same"),
        case("residual_groups2_c6_relu", 2, 6, 9, 9, 10, 3, groups=2, padding=1,
             activation="relu", residual="same"),
        case("residual_same_even_kernel", 1, 4, 7, 9, 6, 2, padding="same", residual="same"),
        case("residual_channel_multiplier2", 1, 6, 9, 11, 12, 3, groups=6, padding=1,
             residual="same"),
    ]
    base = r(2, 6, 15, 17)
    samples.append(SampleInput("noncontiguous_slice", (base[:, 1:5, 1:14, 2:15], r(5, 4, 3, 3),
                                                       r(5)), {"padding": 1}))
    # The output's memory format is PyTorch's: channels-last for a channels-last weight, and
    # for one channel whose strides lean channels-last (contiguous both ways).
    samples.append(case("nchw_input_channels_last_weight", 2, 8, 9, 7, 16, 3, padding=1,
                        weight_channels_last=True))
    one_channel = r(1, 1, 7, 11)[..., 1:10].contiguous(memory_format=torch.channels_last)
    samples.append(SampleInput("one_channel_channels_last_strides",
                               (one_channel, r(3, 1, 3, 3), r(3)), {"stride": 2}))
    samples.append(case("one_filter_channels_last", 2, 3, 6, 5, 1, 3, padding=1,
                        channels_last=True))
    if large:
        samples += [
            case("resnet_3x3_64", 8, 64, 56, 56, 64, 3, padding=1, channels_last=True),
            case("resnet_1x1_256_stride2", 8, 256, 56, 56, 512, 1, stride=2, channels_last=True),
            case("resnet_1x1_64_to_256_relu", 8, 64, 56, 56, 256, 1, channels_last=True,
                 activation="relu"),
            case("resnet_7x7_stem", 4, 3, 224, 224, 64, 7, stride=2, padding=3,
                 channels_last=True, activation="relu"),
        ]
    return samples


def quantize_fp8_reference(x: torch.Tensor, dtype: torch.dtype, granularity: str,
                           block_m: int = 1, block_k: int = 1):
    """quantize_fp8 in plain PyTorch, the same arithmetic bit for bit: amax per group (floor
    1e-12), reciprocal FP8_MAX / amax computed in float64 and rounded to float32, x * that in
    float32, clamp to +-FP8_MAX, round-to-nearest-even cast."""
    fmax = float(torch.finfo(dtype).max)
    xf = x.float()
    m, k = x.shape
    if granularity == "tensor":
        amax = xf.abs().amax() if x.numel() else torch.zeros((), device=x.device)
        expanded = amax
    elif granularity == "row":
        amax = xf.abs().amax(1, keepdim=True) if k else torch.zeros(m, 1, device=x.device)
        expanded = amax
    else:
        bm = block_m if granularity == "block2d" else 1
        pad_m, pad_k = -m % bm, -k % block_k
        padded = torch.nn.functional.pad(xf.abs(), (0, pad_k, 0, pad_m))
        tiles = padded.view((m + pad_m) // bm, bm, (k + pad_k) // block_k, block_k)
        amax = tiles.amax((1, 3))
        expanded = amax.repeat_interleave(bm, 0).repeat_interleave(block_k, 1)[:m, :k]
    amax = amax.clamp_min(1e-12)
    expanded = expanded.clamp_min(1e-12)
    inverse = (fmax / expanded.double()).float()
    q = (xf * inverse).clamp(-fmax, fmax).to(dtype)
    scale = (amax.double() / fmax).float()
    return q, scale.reshape(()) if granularity == "tensor" else scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block=(1, 128)) -> torch.Tensor:
    """q * scale in float64, expanding per-block scales over their blocks."""
    qd = q.double()
    s = scale.double()
    if block[0] > 1 and s.dim() == 2:  # per 2-D block (weights): always expand
        s = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        s = s[:qd.shape[0], :qd.shape[1]]
    elif s.dim() == 2 and s.shape != (qd.shape[0], 1) and s.shape != (1, qd.shape[1]):
        s = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        s = s[:qd.shape[0], :qd.shape[1]]
    return qd * s


def scaled_gemm_reference(a, b, scale_a, scale_b, bias=None):
    """(a * scale_a) @ (b * scale_b) + bias in float64 (scale shapes as scaled_gemm's)."""
    from .ops.fp8 import _scale_kinds

    blocked = _scale_kinds(scale_a, scale_b, a.shape[0], b.shape[1], a.shape[1])[0] == 2
    a64 = dequantize_fp8(a, scale_a, (1, 128))
    b64 = dequantize_fp8(b, scale_b, (128, 128)) if blocked else dequantize_fp8(b, scale_b)
    out = a64 @ b64
    return out + bias.double() if bias is not None else out


_WORD = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) in plain PyTorch: ``counter`` four int64 tensors
    (or ints) of 32-bit values, ``key`` two ints; returns the four output words as int64
    tensors. (int64 products wrap modulo 2**64, which keeps both 32-bit halves exact.)"""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        a_c0, b_c2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (((b_c2 >> 32) & _WORD) ^ c1 ^ k0, b_c2 & _WORD,
                          ((a_c0 >> 32) & _WORD) ^ c3 ^ k1, a_c0 & _WORD)
        k0, k1 = (k0 + 0x9E3779B9) & _WORD, (k1 + 0xBB67AE85) & _WORD
    return c0, c1, c2, c3


def attention_dropout_keep_reference(seed: int, batch: int, heads: int, seqlen_q: int,
                                     seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The attention kernels' documented dropout mask, (batch, heads, seqlen_q, seqlen_k)
    bool on the CPU, from its definition: probability (row, key) of stream b * heads + h
    is kept when word key % 4 of Philox4x32-10 keyed (seed low, seed high) at counter
    (key // 4, row, stream, 0) is >= round(dropout_p * 2**32)."""
    stream = torch.arange(batch * heads).view(batch, heads, 1, 1)
    row = torch.arange(seqlen_q).view(1, 1, seqlen_q, 1)
    key = torch.arange(seqlen_k).view(1, 1, 1, seqlen_k)
    shape = (batch, heads, seqlen_q, seqlen_k)
    words = philox4x32_10((key.div(4, rounding_mode="floor").expand(shape), row.expand(shape),
                           stream.expand(shape), torch.zeros(shape, dtype=torch.int64)),
                          (seed & _WORD, (seed >> 32) & _WORD))
    word = torch.stack(words, -1).gather(-1, (key % 4).expand(shape)[..., None])[..., 0]
    return word >= min(round(dropout_p * 2**32), 2**32 - 1)

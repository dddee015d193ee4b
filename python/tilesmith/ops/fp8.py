"""FP8 (float8_e4m3fn, float8_e5m2): ``quantize_fp8`` (amax, scale and cast on the device)
and ``scaled_gemm`` (fp8 x fp8 -> bf16/fp16/fp32 with per-tensor, per-row/column or
per-block scales, fp32 accumulation, gemm's epilogue: bias, activation, residual).
Kernels: kernels/fp8.py (Triton: both ops) and csrc/fp8/ (CUDA, in tilesmith._C_sm90a:
both ops on an H100/H200, scaled_gemm with wgmma).

Scale shapes (dequantization multipliers, x ~ x_fp8 * scale, as torch._scaled_mm):
    quantize_fp8(x (M, K), granularity=)  "tensor": ()   "row": (M, 1)
                                          "block", block_size=b: (M, ceil(K / b))
                                          "block", block_size=(b, b): (ceil(M / b), ceil(K / b))
    scaled_gemm(a (M, K), b (K, N), scale_a, scale_b):
        scale_a: () | (M, 1) | (M, ceil(K / 128));  scale_b: () | (1, N) | (ceil(K / 128),
        ceil(N / 128)). A weight quantized row-wise as (N, K) is b = w_fp8.t() with
        scale_b = scale.t(); block-quantized with block_size=(128, 128) it is the same with
        the (ceil(N/128), ceil(K/128)) scale transposed.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from ._library import LIBRARY, MAX_GRID_YZ, new_output, spill_grid, wrap_triton
from .gemm import ACTIVATION_NAMES, torch_activation

LIBRARY.define("quantize_fp8_cuda(Tensor x, ScalarType dtype, int granularity, int block_m, "
               "int block_k) -> (Tensor, Tensor)")
LIBRARY.define("scaled_gemm_cuda(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, "
               "Tensor? bias, Tensor? residual, str activation, ScalarType out_dtype, "
               "int scale_a_kind, int scale_b_kind, bool save_pre) -> (Tensor, Tensor)")

from .. import backend as _backend  # noqa: E402  (loads the extensions after the schema)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_BLOCK = 128  # the block of scaled_gemm's per-block scales
# (mantissa bits, smallest normal exponent) of each format, for the interpreter's rounding.
_FORMAT = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
_GRANULARITY = {"tensor": 0, "row": 1, "block": 2, "block2d": 3}


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _scale_shape(m: int, k: int, kind: int, block_m: int, block_k: int) -> tuple[int, ...]:
    return [(), (m, 1), (m, -(-k // block_k)), (-(-m // block_m), -(-k // block_k))][kind]


def _floor_scale(dtype: torch.dtype) -> float:
    """The scale of a group with no values: the amax floor 1e-12 (as float32, the kernels'
    and the reference's) over FP8_MAX, divided in float64 and rounded to float32."""
    return float(torch.tensor(1e-12, dtype=torch.float32).double() / fp8_max(dtype))


@torch.library.register_fake("tilesmith::quantize_fp8_cuda")
def _quantize_fp8_cuda_fake(x, dtype, granularity, block_m, block_k):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=dtype),
            x.new_empty(_scale_shape(m, k, granularity, block_m, block_k),
                        dtype=torch.float32))


@triton_op("tilesmith::quantize_fp8_triton", mutates_args=())
def _quantize_fp8_triton(x: torch.Tensor, dtype: torch.dtype, granularity: str,
                         block_m: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    from tilesmith.kernels.fp8 import amax_kernel, quantize_kernel
    from tilesmith.kernels.matmul import INTERPRETING

    m, k = x.shape
    q = new_output((m, k), like=x, dtype=dtype)
    kind = _GRANULARITY[granularity]
    scale = new_output(_scale_shape(m, k, kind, block_m, block_k), like=x, dtype=torch.float32)
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:  # nothing to reduce: every group's amax is the floor
        return q, scale.fill_(_floor_scale(dtype))
    mantissa, min_exponent = _FORMAT[dtype]
    common = dict(FP8_MAX=fp8_max(dtype), MANTISSA_BITS=mantissa, MIN_EXPONENT=min_exponent,
                  UPCAST=INTERPRETING)
    tile_m = block_m if kind == 3 else (16 if INTERPRETING else 32)
    tile_k = block_k if kind in (2, 3) else (64 if INTERPRETING else 128)
    column_blocks = spill_grid(triton.cdiv(k, tile_k))  # a (1, 10M) x has 78k of them
    if kind == 0:
        wrap_triton(amax_kernel)[(triton.cdiv(m, tile_m), *column_blocks)](
            x, amax, m, k, x.stride(0), x.stride(1), BLOCK_M=tile_m, BLOCK_K=tile_k)
    grid = (triton.cdiv(m, tile_m), *((1, 1) if kind == 1 else column_blocks))
    scale_strides = (scale.stride(0), scale.stride(1)) if scale.dim() == 2 else (0, 0)
    wrap_triton(quantize_kernel)[grid](
        x, q, scale, amax, m, k, x.stride(0), x.stride(1), *scale_strides, GRANULARITY=kind,
        BLOCK_M=tile_m, BLOCK_K=tile_k, **common)
    return q, scale


def quantize_fp8(x: torch.Tensor, *, dtype: torch.dtype = torch.float8_e4m3fn,
                 granularity: str = "tensor", block_size=128, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8, scale) with x ~ x_fp8 * scale; scale = amax / max(dtype) per tensor, row, or
    block (see the module docstring for shapes). x: 2-D (M, K), fp16/bf16/fp32.
    Values saturate at the format's max; all-zero input gives zeros. A NaN makes its
    group's scale and values NaN, an infinity its group's scale inf and its own value NaN
    (the group dequantizes to NaN either way), as a torch.amax-based reference does; no
    backend makes them finite. Tensor-wise scaling
    reduces in two kernels (tile amax with an atomic max into a device scalar, then scale
    and cast reading it), so nothing waits on the host."""
    fn = "quantize_fp8"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be a 2-D tensor, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{fn}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if dtype not in FP8_DTYPES:
        raise TypeError(f"{fn}: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got "
                        f"{dtype}")
    if granularity not in ("tensor", "row", "block"):
        raise ValueError(f"{fn}: granularity must be 'tensor', 'row' or 'block', got "
                         f"{granularity!r}")
    block_m, block_k = 1, 1
    if granularity == "block":
        if isinstance(block_size, int):
            block_k = block_size
        elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
            block_m, block_k = block_size
            granularity = "block2d"
        else:
            raise TypeError(f"{fn}: block_size must be an int or a pair, got {block_size!r}")
        for b in ((block_m, block_k) if granularity == "block2d" else (block_k,)):
            if not isinstance(b, int) or b < 16 or b & (b - 1):
                raise ValueError(f"{fn}: block sizes must be powers of two >= 16, got "
                                 f"{block_size!r}")
    name = _backend.pick("fp8", x, backend,
                         {"cuda": _cuda_quantize_cannot(x.shape, granularity, block_k)})
    if name == "torch":
        from ..testing import quantize_fp8_reference

        return quantize_fp8_reference(x, dtype, granularity, block_m, block_k)
    if name == "cuda":
        return torch.ops.tilesmith.quantize_fp8_cuda(x, dtype, _GRANULARITY[granularity],
                                                     block_m, block_k)
    return torch.ops.tilesmith.quantize_fp8_triton(x, dtype, granularity, block_m, block_k)


def _cuda_quantize_cannot(shape, granularity, block_k):
    """Why the cuda quantize_fp8 cannot take an x of ``shape``, or None: as
    csrc/fp8/fp8_api.cpp checks, its column groups (scale blocks, and groups of 256 columns)
    go on grid axis y, which holds 65535."""
    k = shape[1]
    blocked = granularity in ("block", "block2d")
    blocks = -(-k // block_k) if blocked else 1
    if blocks <= MAX_GRID_YZ and k // 256 < MAX_GRID_YZ:
        return None
    blocks_rule = (f"at most {MAX_GRID_YZ} column blocks ({blocks} of {block_k} here) and "
                   if blocked else "")
    return (f"x {tuple(shape)} is too wide for its grid, which takes {blocks_rule}fewer than "
            f"{MAX_GRID_YZ} * 256 columns; the triton backend takes it")


def _scale_kind(scale, rows, cols, blocks_k, blocks_other, operand):
    """0 tensor, 1 per row of a / column of b, 2 per block; by the scale's shape."""
    shape = tuple(scale.shape)
    if scale.numel() == 1 and len(shape) <= 2:
        return 0
    if operand == "a":
        if shape == (rows, 1):
            return 1
        if shape == (rows, blocks_k):
            return 2
        expected = f"() per tensor, ({rows}, 1) per row or ({rows}, {blocks_k}) per block"
    else:
        if shape == (1, cols):
            return 1
        if shape == (blocks_k, blocks_other):
            return 2
        expected = (f"() per tensor, (1, {cols}) per column or ({blocks_k}, {blocks_other}) "
                    "per block")
    raise ValueError(f"scaled_gemm: scale_{operand} has shape {shape}; expected {expected}")


def _scale_kinds(scale_a, scale_b, m, n, k):
    """(kind of scale_a, kind of scale_b). Shapes can coincide (one K block makes a per-block
    scale_a (M, 1), the per-row shape; M = 1 makes it a single element): when the other
    operand is per-block, a scale of the per-block shape is per-block, which for one block
    is also what the per-row/tensor reading would compute."""
    blocks_k = -(-k // SCALE_BLOCK)
    blocks_n = -(-n // SCALE_BLOCK)
    kind_a = _scale_kind(scale_a, m, n, blocks_k, blocks_k, "a")
    kind_b = _scale_kind(scale_b, m, n, blocks_k, blocks_n, "b")
    if kind_b == 2 and kind_a != 2 and tuple(scale_a.shape) in ((m, blocks_k),) + (
            ((), (1,), (1, 1)) if m == 1 and blocks_k == 1 else ()):
        kind_a = 2
    if kind_a == 2 and kind_b != 2 and tuple(scale_b.shape) in ((blocks_k, blocks_n),) + (
            ((), (1,), (1, 1)) if blocks_k == 1 and blocks_n == 1 else ()):
        kind_b = 2
    if (kind_a == 2) != (kind_b == 2):
        raise ValueError(f"scaled_gemm: per-block scaling needs both scale_a and scale_b per "
                         f"block, got shapes {tuple(scale_a.shape)} and "
                         f"{tuple(scale_b.shape)}")
    return kind_a, kind_b


@torch.library.register_fake("tilesmith::scaled_gemm_cuda")
def _scaled_gemm_cuda_fake(a, b, scale_a, scale_b, bias, residual, activation, out_dtype,
                           scale_a_kind, scale_b_kind, save_pre):
    m, n = a.shape[0], b.shape[1]
    return (a.new_empty((m, n), dtype=out_dtype),
            a.new_empty((m, n) if save_pre else (0, 0), dtype=out_dtype))


@triton_op("tilesmith::scaled_gemm_triton", mutates_args=())
def _scaled_gemm_triton(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor,
                        scale_b: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None, activation: str, out_dtype: torch.dtype,
                        save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    from tilesmith.kernels.fp8 import scaled_gemm_kernel
    from tilesmith.kernels.gemm import ACTIVATIONS
    from tilesmith.kernels.matmul import INTERPRETING

    m, k = a.shape
    n = b.shape[1]
    kind_a, kind_b = _scale_kinds(scale_a, scale_b, m, n, k)
    if bias is not None:  # the kernel reads bias[n] at n (a strided or expanded one: copied)
        bias = bias.contiguous()
    out = new_output((m, n), like=a, dtype=out_dtype)
    pre = new_output((m, n) if save_pre else (0, 0), like=a, dtype=out_dtype)
    if out.numel() == 0:
        return out, pre
    if kind_a == 2 or kind_b == 2:
        # Per-block scales need K steps and N tiles aligned with the 128-wide blocks.
        blocks = dict(BLOCK_M=32 if INTERPRETING else 128, BLOCK_N=SCALE_BLOCK,
                      BLOCK_K=SCALE_BLOCK, num_warps=4 if INTERPRETING else 8, num_stages=3)
    elif INTERPRETING:
        blocks = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    else:
        blocks = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4)
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    sa = scale_a.reshape(1, 1) if scale_a.dim() < 2 else scale_a
    sb = scale_b.reshape(1, 1) if scale_b.dim() < 2 else scale_b
    wrap_triton(scaled_gemm_kernel)[grid](
        a, b, out, sa, sb, bias if bias is not None else out,
        residual if residual is not None else out, pre if save_pre else out, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1),
        *((residual.stride(0), residual.stride(1)) if residual is not None else (0, 0)),
        A_SCALE=kind_a, B_SCALE=kind_b, HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATIONS[None if activation == "none" else activation],
        HAS_RESIDUAL=residual is not None, STORE_PRE=save_pre, UPCAST=INTERPRETING,
        GROUP_M=8, **blocks)
    return out, pre


def scaled_gemm(a_fp8: torch.Tensor, b_fp8: torch.Tensor, scale_a: torch.Tensor,
                scale_b: torch.Tensor, *, bias: torch.Tensor | None = None,
                activation: str | None = None, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None
                ) -> torch.Tensor:
    """``activation((a_fp8 * scale_a) @ (b_fp8 * scale_b) + bias) + residual`` with fp32
    accumulation and the epilogue in fp32, rounded once to ``out_dtype``. a (M, K), b (K, N)
    in float8_e4m3fn or float8_e5m2 (they may differ: e5m2 gradients times e4m3 weights);
    the granularity of each scale is read from its shape (module docstring); per-block
    scaling needs both operands per-block. K need not be a multiple of 128.
    ``activation``: as gemm's (None, "relu", "gelu", "gelu_tanh", "silu", "relu6",
    "hardswish", "sigmoid", "hardsigmoid"). ``bias``: (N,), read in fp32. ``residual``:
    (M, N), read in ``out_dtype`` (converted to it where it differs). No autograd
    (tilesmith.nn.Float8Linear trains)."""
    return scaled_gemm_with_pre(a_fp8, b_fp8, scale_a, scale_b, bias, activation, residual,
                                out_dtype, backend, save_pre=False)[0]


def scaled_gemm_with_pre(a_fp8, b_fp8, scale_a, scale_b, bias, activation, residual,
                         out_dtype, backend, save_pre: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """scaled_gemm's (out, pre): pre (M, N) in out_dtype, the value the activation was
    applied to, where ``save_pre`` (for Float8Linear's backward; else an empty tensor)."""
    fn = "scaled_gemm"
    for name, t in (("a_fp8", a_fp8), ("b_fp8", b_fp8)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be a 2-D tensor")
        if t.dtype not in FP8_DTYPES:
            raise TypeError(f"{fn}: {name} must be float8_e4m3fn or float8_e5m2, got {t.dtype}")
    if a_fp8.shape[1] != b_fp8.shape[0]:
        raise ValueError(f"{fn}: inner dimensions differ: a {tuple(a_fp8.shape)} @ b "
                         f"{tuple(b_fp8.shape)}")
    if b_fp8.device != a_fp8.device:
        raise ValueError(f"{fn}: b_fp8 is on {b_fp8.device}, a_fp8 on {a_fp8.device}")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            raise TypeError(f"{fn}: {name} must be a float32 tensor")
        if s.device != a_fp8.device:
            raise ValueError(f"{fn}: {name} is on {s.device}, a_fp8 on {a_fp8.device}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{fn}: out_dtype must be bfloat16, float16 or float32")
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATION_NAMES}, got "
                         f"{activation!r}")
    m, k = a_fp8.shape
    n = b_fp8.shape[1]
    for name, t, shape in (("bias", bias, (n,)), ("residual", residual, (m, n))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape} for a "
                             f"{tuple(a_fp8.shape)} @ b {tuple(b_fp8.shape)}, got "
                             f"{tuple(t.shape)}")
        if t.device != a_fp8.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, a_fp8 on {a_fp8.device}")
    if residual is not None and residual.dtype != out_dtype:
        residual = residual.to(out_dtype)
    kind_a, kind_b = _scale_kinds(scale_a, scale_b, m, n, k)
    name = _backend.pick("fp8", a_fp8, backend)
    if name == "torch":
        from ..testing import scaled_gemm_reference

        z = scaled_gemm_reference(a_fp8, b_fp8, scale_a, scale_b, bias)
        out = torch_activation(z, activation)
        if residual is not None:
            out = out + residual.double()
        pre = z.to(out_dtype) if save_pre else out.new_empty((0, 0), dtype=out_dtype)
        return out.to(out_dtype), pre
    if name == "cuda":
        return torch.ops.tilesmith.scaled_gemm_cuda(a_fp8, b_fp8, scale_a, scale_b, bias,
                                                    residual, activation or "none", out_dtype,
                                                    kind_a, kind_b, save_pre)
    return torch.ops.tilesmith.scaled_gemm_triton(a_fp8, b_fp8, scale_a, scale_b, bias,
                                                  residual, activation or "none", out_dtype,
                                                  save_pre)

"""Small @triton.jit helpers shared by several kernel files."""

import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32. The interpreter's own
    fp32 -> bf16 cast truncates, which doubles the rounding error and would fail the
    2x-PyTorch accuracy rule on the CPU for a reason that does not exist on a GPU; after this
    the truncating cast is exact. (Inputs are finite: NaN/inf are not special-cased.)"""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_output(x, out_ptr, UPCAST: tl.constexpr):
    """``x`` cast to the element type of ``out_ptr``, rounding to nearest under the
    interpreter too (see round_to_bfloat16)."""
    if UPCAST:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            x = round_to_bfloat16(x.to(tl.float32))
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def spilled_program_id():
    """This program's index along a logical axis laid over grid axes 1 and 2 by
    tilesmith.ops._library.spill_grid (64-bit: 65535 * 65535 passes 2**31)."""
    return tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)

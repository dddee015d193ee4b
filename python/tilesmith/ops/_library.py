"""The one owner of the ``tilesmith`` op namespace. Ops whose kernels are C++ are defined
here (``LIBRARY.define``) by their op family's file; ops whose kernels are Triton are defined
by ``torch.library.triton_op`` in that same file. The CUDA extension only binds kernels."""

import os

import torch

LIBRARY = torch.library.Library("tilesmith", "DEF")


def new_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Output allocation for every op. Under ``tilesmith.testing.poison_outputs()`` outputs
    start NaN-filled, so an element a kernel fails to write cannot pass a test."""
    dtype = dtype or like.dtype
    if os.environ.get("TILESMITH_POISON_OUTPUTS"):
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def dot_precision(dtype: torch.dtype) -> str:
    """Triton ``input_precision`` for dots on ``dtype`` inputs. fp32 follows
    torch.set_float32_matmul_precision, as torch.matmul does: "highest" (PyTorch's default)
    computes in IEEE fp32, "high"/"medium" in TF32. Other dtypes are exact products."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"

"""tilesmith's ops, one file per op family: schema, fake kernel, autograd, backend dispatch."""

from .attention import attention, scaled_dot_product_attention, varlen_attention
from .gemm import gemm
from .matmul import matmul

__all__ = ["attention", "gemm", "matmul", "scaled_dot_product_attention", "varlen_attention"]

"""tilesmith's ops, one file per op family: schema, fake kernel, autograd, backend dispatch."""

from .attention import attention, scaled_dot_product_attention, varlen_attention
from .matmul import matmul

__all__ = ["attention", "matmul", "scaled_dot_product_attention", "varlen_attention"]

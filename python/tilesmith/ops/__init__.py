"""tilesmith's ops, one file per op family: schema, fake kernel, autograd, backend dispatch."""

from .attention import attention, scaled_dot_product_attention, varlen_attention
from .conv2d import conv2d
from .fp8 import quantize_fp8, scaled_gemm
from .gemm import gemm
from .matmul import matmul

__all__ = ["attention", "conv2d", "gemm", "matmul", "quantize_fp8", "scaled_dot_product_attention",
           "scaled_gemm", "varlen_attention"]

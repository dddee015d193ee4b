"""tilesmith's ops, one file per op family: schema, fake kernel, autograd, backend dispatch."""

from .attention import attention, scaled_dot_product_attention, varlen_attention
from .attention import dropout_keep_mask as attention_dropout_mask
from .attention import kernel_limits as attention_kernel_limits
from .attention import split_keys as attention_split_keys
from .conv2d import conv2d
from .conv2d import kernel_limits as conv2d_kernel_limits
from .fp8 import quantize_fp8, scaled_gemm
from .gemm import gemm
from .matmul import matmul

__all__ = ["attention", "attention_dropout_mask", "attention_kernel_limits",
           "attention_split_keys", "conv2d",
           "conv2d_kernel_limits", "gemm", "matmul", "quantize_fp8",
           "scaled_dot_product_attention", "scaled_gemm", "varlen_attention"]

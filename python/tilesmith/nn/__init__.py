"""Drop-in modules built on tilesmith's ops, and the tools to use them in existing models."""

from .convert import ConversionReport, convert, patch_sdpa, unpatch_sdpa
from .float8 import Float8Linear
from .inference import optimize_for_inference
from .modules import Conv2d, Linear, MultiheadAttention

__all__ = ["Conv2d", "ConversionReport", "Float8Linear", "Linear", "MultiheadAttention",
           "convert", "optimize_for_inference", "patch_sdpa", "unpatch_sdpa"]

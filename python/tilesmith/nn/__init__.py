"""Drop-in modules built on tilesmith's ops, and the tools to use them in existing models."""

from .convert import ConversionReport, convert, patch_sdpa, unpatch_sdpa
from .float8 import Float8Linear
from .modules import Conv2d, Linear, MultiheadAttention

__all__ = ["Conv2d", "ConversionReport", "Float8Linear", "Linear", "MultiheadAttention",
           "convert", "patch_sdpa", "unpatch_sdpa"]

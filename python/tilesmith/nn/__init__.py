"""Drop-in modules built on tilesmith's ops."""

from .float8 import Float8Linear

__all__ = ["Float8Linear"]

"""tilesmith's ops, one file per op family: schema, fake kernel, autograd, backend dispatch."""

from .matmul import matmul

__all__ = ["matmul"]

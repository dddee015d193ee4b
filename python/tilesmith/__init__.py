"""tilesmith: hand-written CUDA C++ and Triton kernels as PyTorch custom ops.

    import tilesmith
    c = tilesmith.ops.matmul(a, b)                      # default backend for this op/dtype
    c = tilesmith.ops.matmul(a, b, backend="triton")    # or one named per call
    with tilesmith.use_backend("cuda"):                 # or for a block
        c = tilesmith.ops.matmul(a, b)
    tilesmith.available_backends("matmul")              # what works here
"""

from . import ops  # defines the op schemas before the extensions bind kernels to them
from . import nn
from .backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    use_backend,
)

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "nn", "ops",
           "use_backend"]
__version__ = "0.1.0"

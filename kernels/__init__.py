"""tilesmith's Triton kernels (import path ``tilesmith.kernels``): @triton.jit functions and
their autotune configs only; the ops in ``tilesmith.ops`` check, allocate and launch."""

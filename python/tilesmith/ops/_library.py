"""The one owner of the ``tilesmith`` op namespace. Ops whose kernels are C++ are defined
here (``LIBRARY.define``) by their op family's file; ops whose kernels are Triton are defined
by ``torch.library.triton_op`` in that same file. The CUDA extension only binds kernels."""

import os

import torch

LIBRARY = torch.library.Library("tilesmith", "DEF")


def new_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Output allocation for every op. Under ``tilesmith.testing.poison_outputs()`` outputs
    start NaN-filled, so an element a kernel fails to write cannot pass a test."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device,
                      memory_format=memory_format)
    if os.environ.get("TILESMITH_POISON_OUTPUTS"):
        out.fill_(float("nan"))
    return out


def wrap_triton(kernel):
    """``torch.library.wrap_triton``, except for a kernel the Triton interpreter made
    (TRITON_INTERPRET=1), which is returned as is and launched eagerly: torch 2.14 does the
    same itself, torch 2.11 raises for a plain ``@triton.jit`` kernel there."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


# CUDA's limit on a grid's y and z extents (x takes up to 2**31 - 1); the Triton
# interpreter does not enforce it, so tests cannot see a launch that passes it.
MAX_GRID_YZ = 65535


def spill_grid(count: int) -> tuple[int, int]:
    """(y, z) grid extents for ``count`` programs along one logical axis that may pass
    MAX_GRID_YZ (a matmul's batch, a wide row's column blocks): y * z >= count, each within
    the limit. The kernel reads its index with kernels/_common.py's spilled_program_id and
    skips indices >= count (the last z slice may reach past it)."""
    y = min(count, MAX_GRID_YZ)
    return y, -(-count // max(y, 1))


def dot_precision(dtype: torch.dtype) -> str:
    """Triton ``input_precision`` for dots on ``dtype`` inputs. fp32 follows
    torch.set_float32_matmul_precision, as torch.matmul does: "highest" (PyTorch's default)
    computes in IEEE fp32, "high"/"medium" in TF32. Other dtypes are exact products."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def autocast_inputs(*tensors):
    """Under torch.autocast, cast floating-point tensors to the autocast dtype up front, as
    autocast does for matmul, conv and attention (so the checks that follow, which want one
    dtype, see what the op will compute in). The first must be a tensor; None passes through."""
    device_type = tensors[0].device.type  # the first is the op's first input, a tensor
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (
        torch.float32, torch.float16, torch.bfloat16) else t for t in tensors)


def _cast_floating(value, dtype):
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    return value


def register_autocast(op_name: str) -> None:
    """Autocast kernels for ``tilesmith::op_name`` on CUDA and CPU: floating inputs are cast
    to the autocast dtype in force at the call (fp16 or bf16), as autocast does for torch's
    matmul, conv and attention, so torch.ops.tilesmith.* behave like the native ops.
    (torch.library.register_autocast would fix one dtype at registration time.)"""
    op = getattr(torch.ops.tilesmith, op_name).default
    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
        dispatch_key = getattr(torch._C.DispatchKey, key)

        def kernel(*args, _device_type=device_type, _dispatch_key=dispatch_key):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_dispatch_key)):
                return op(*_cast_floating(args, dtype))

        LIBRARY.impl(op_name, kernel, key)

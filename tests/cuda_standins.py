"""CPU stand-ins for the cuda backend's registered ops, so that the Python around them runs
in the CPU test suite: the cuda branches of tilesmith.ops (zero-filled channels, layouts,
the autograd formulas and the backward calls they make) otherwise first run on a GPU.

Each stand-in checks what its C++ function checks (csrc/*/*_api.cpp; the check that
tensors are on a GPU aside), returns outputs of the shapes, dtypes and layouts the C++
returns, and computes them with PyTorch in float32. They say nothing of the kernels: those
are test_cuda_emulated's and the GPU run's. ``enabled()`` registers them for CPU tensors
and makes the cuda backend available there, for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tilesmith import backend

ACTIVATIONS = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu,
               "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu}
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)


def check(condition: bool, message: str) -> None:
    """TORCH_CHECK: a RuntimeError, as the C++ functions raise."""
    if not condition:
        raise RuntimeError(message)


def _activation(name: str, op: str):
    check(name in ACTIVATIONS, f"{op}: activation must be none, relu, gelu, gelu_tanh or silu, "
          f"got {name}")
    return ACTIVATIONS[name]


# --- matmul and gemm: csrc/matmul/matmul_api.cpp, csrc/gemm/gemm_api.cpp -----------------------

def _check_tensor_core_operands(a, b, op):
    check(a.dtype == b.dtype, f"{op}: a and b must have the same dtype")
    check(a.dtype in TENSOR_CORE_DTYPES, f"{op} (cuda backend): dtype must be float16 or "
          f"bfloat16, got {a.dtype}")


def matmul_cuda(a, b):
    _check_tensor_core_operands(a, b, "matmul")
    check(a.dim() == b.dim() and a.dim() in (2, 3), "matmul_cuda: a and b must both be 2-D or "
          "both 3-D")
    check(a.dim() == 2 or a.shape[0] == b.shape[0], "matmul_cuda: batch sizes differ")
    check(a.shape[-1] == b.shape[-2], "matmul: inner dimensions differ")
    return torch.matmul(a.float(), b.float()).to(a.dtype).contiguous()


def gemm_cuda(a, b, bias, residual, activation, alpha, out_dtype, save_pre):
    _check_tensor_core_operands(a, b, "gemm")
    check(a.dim() == 2 and b.dim() == 2, "gemm: a and b must be 2-D")
    check(out_dtype in (a.dtype, torch.float32), "gemm (cuda backend): out_dtype must be the "
          "input dtype or float32")
    m, k = a.shape
    n = b.shape[1]
    check(b.shape[0] == k, "gemm: inner dimensions differ")
    check(bias is None or tuple(bias.shape) == (n,), "gemm: bias must have shape (n,)")
    check(residual is None or tuple(residual.shape) == (m, n), "gemm: residual must be (m, n)")
    act = _activation(activation, "gemm")
    z = alpha * (a.float() @ b.float())
    if bias is not None:
        z = z + bias.float()
    out = act(z)
    if residual is not None:
        out = out + residual.to(out_dtype).float()
    pre = z.to(out_dtype) if save_pre else a.new_empty((0, 0), dtype=out_dtype)
    return out.to(out_dtype), pre


def activation_backward_cuda(grad, pre, activation, bias_grad, dz_dtype):
    check(pre.dim() == 2 and grad.shape == pre.shape, "activation_backward: grad and pre must "
          "be 2-D of one shape")
    check(dz_dtype in TENSOR_CORE_DTYPES, "activation_backward (cuda backend): dz_dtype must be "
          "float16 or bfloat16")
    check(pre.dtype in (dz_dtype, torch.float32), "activation_backward (cuda backend): pre "
          "must be float32 or dz_dtype")
    check(grad.dtype in (pre.dtype, torch.float32), "activation_backward (cuda backend): grad "
          "must be float32 or pre's dtype")
    act = _activation(activation, "activation_backward")
    z = pre.detach().float().requires_grad_(True)
    with torch.enable_grad():
        (dz,) = torch.autograd.grad(act(z), z, grad.float())
    sums = dz.sum(0) if bias_grad else dz.new_empty((0,))
    return dz.to(dz_dtype).contiguous(), sums


# --- conv2d: csrc/conv2d/conv2d_api.cpp ---------------------------------------------------------

def _check_conv_operand(t, name, like):
    check(t.dtype in TENSOR_CORE_DTYPES, f"conv2d (cuda backend): {name} must be float16 or "
          f"bfloat16, got {t.dtype}")
    check(t.dtype == like.dtype, f"conv2d: {name} has dtype {t.dtype}, expected {like.dtype}")
    check(t.dim() == 4, f"conv2d: {name} must be 4-D, got shape {tuple(t.shape)}")


def _is_depthwise(channels, filters, weight_channels):
    return weight_channels == 1 and filters == channels and channels > 1


def _conv_geometry(c, k, c_group, stride, padding, dilation, depthwise):
    """The groups, after geometry()'s or depthwise_geometry()'s checks."""
    check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
          "conv2d: stride, padding and dilation must each have 2 entries")
    if depthwise:
        check(c % 8 == 0, f"conv2d (cuda backend): depthwise channels must be a multiple of 8 "
              f"(16-byte vectors), got {c}")
        return c
    check(c_group > 0 and c % c_group == 0 and k % (c // c_group) == 0,
          f"conv2d: {c} input channels and {k} filters do not split into groups of {c_group}")
    groups = c // c_group
    check(c_group % 8 == 0 and (k // groups) % 8 == 0,
          f"conv2d (cuda backend): input channels and filters per group must be multiples of "
          f"8 (16-byte rows), got {c_group} and {k // groups} (groups {groups})")
    return groups


def _is_channels_last(t):
    return (t.is_contiguous(memory_format=torch.channels_last)
            and torch._prims_common.suggest_memory_format(t) == torch.channels_last)


def _in_layout(t, channels_last):
    """A channels-last result as the C++ returns it: as it is, or cloned to NCHW."""
    t = t.contiguous(memory_format=torch.channels_last)
    return t if channels_last else t.clone(memory_format=torch.contiguous_format)


def conv2d_fwd_cuda(x, weight, bias, stride, padding, dilation, activation, save_pre):
    _check_conv_operand(x, "input", x)
    _check_conv_operand(weight, "weight", x)
    c, k = x.shape[1], weight.shape[0]
    groups = _conv_geometry(c, k, weight.shape[1], stride, padding, dilation,
                            _is_depthwise(c, k, weight.shape[1]))
    check(bias is None or tuple(bias.shape) == (k,), f"conv2d: bias must be a ({k},) tensor")
    act = _activation(activation, "conv2d")
    z = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride,
                 padding, dilation, groups)
    check(z.shape[2] > 0 and z.shape[3] > 0, "conv2d: empty output")
    channels_last = _is_channels_last(x)
    pre = (_in_layout(z.to(x.dtype), channels_last) if save_pre
           else x.new_empty((0, 0, 0, 0)))
    return _in_layout(act(z).to(x.dtype), channels_last), pre


def conv2d_dgrad_cuda(grad, weight, input_shape, stride, padding, dilation, want_channels_last):
    _check_conv_operand(grad, "grad", grad)
    _check_conv_operand(weight, "weight", grad)
    check(len(input_shape) == 4, "conv2d dgrad: input_shape must have 4 entries")
    n, c = input_shape[:2]
    k = weight.shape[0]
    groups = _conv_geometry(c, k, weight.shape[1], stride, padding, dilation,
                            _is_depthwise(c, k, weight.shape[1]))
    check(stride[0] * stride[1] <= 65535, "conv2d dgrad on the cuda backend takes "
          "stride_h * stride_w up to 65535")
    dx = torch.nn.grad.conv2d_input(list(input_shape), weight.float(), grad.float(), stride,
                                    padding, dilation, groups)
    expected = F.conv2d(dx.new_empty(input_shape), weight.float(), None, stride, padding,
                        dilation, groups).shape
    check(grad.shape == expected, f"conv2d dgrad: grad has shape {tuple(grad.shape)}, the "
          f"forward's output was {tuple(expected)}")
    return _in_layout(dx.to(grad.dtype), want_channels_last)


def conv2d_wgrad_cuda(grad, x, weight_shape, stride, padding, dilation):
    _check_conv_operand(grad, "grad", grad)
    _check_conv_operand(x, "input", grad)
    check(len(weight_shape) == 4, "conv2d wgrad: weight_shape must have 4 entries")
    c, k = x.shape[1], weight_shape[0]
    groups = _conv_geometry(c, k, weight_shape[1], stride, padding, dilation,
                            _is_depthwise(c, k, weight_shape[1]))
    dw = torch.nn.grad.conv2d_weight(x.float(), list(weight_shape), grad.float(), stride,
                                     padding, dilation, groups)
    expected = F.conv2d(x.float(), dw, None, stride, padding, dilation, groups).shape
    check(grad.shape == expected, f"conv2d wgrad: grad has shape {tuple(grad.shape)}, the "
          f"forward's output was {tuple(expected)}")
    # (K, R, S, C) memory seen as (K, C, R, S): channels-last strides.
    return dw.to(x.dtype).contiguous(memory_format=torch.channels_last)


STANDINS = {
    "matmul_cuda": matmul_cuda,
    "gemm_cuda": gemm_cuda,
    "activation_backward_cuda": activation_backward_cuda,
    "conv2d_fwd_cuda": conv2d_fwd_cuda,
    "conv2d_dgrad_cuda": conv2d_dgrad_cuda,
    "conv2d_wgrad_cuda": conv2d_wgrad_cuda,
}


@contextlib.contextmanager
def enabled():
    """The stand-ins registered for CPU tensors, and the cuda backend available for them
    (for the ops with a stand-in), until the block ends."""
    library = torch.library.Library("tilesmith", "IMPL")
    for name, function in STANDINS.items():
        library.impl(name, function, "CPU")
    real = backend.unavailable_reason

    def unavailable_reason(name, op, device, dtype=None):
        if name == "cuda" and torch.device(device).type == "cpu":
            if dtype is not None and dtype not in backend.SUPPORTED_DTYPES[op]["cuda"]:
                return f"the cuda backend of {op} does not take {dtype}"
            return None
        return real(name, op, device, dtype)

    backend.unavailable_reason = unavailable_reason
    try:
        yield
    finally:
        backend.unavailable_reason = real
        library._destroy()

"""Float8Linear: a drop-in for torch.nn.Linear that computes its three products in FP8.

scaling="row" (the default): forward, x and W quantized to e4m3 with dynamic row-wise
scales (per token, per output feature), y = scaled_gemm(x, W^T) + bias. Backward: the
incoming gradient quantized to e5m2 (wider range, what gradients need), per row; each
product re-quantizes its operands along its own reduction dimension (W per input feature
for dX, x per input feature and the gradient per output feature for dW), so every scale is
constant along the dimension summed.

scaling="tensor": one dynamic scale per tensor (torchao's default recipe). A scalar scale
holds along every dimension, so the backward reuses the forward's fp8 x and W (saved
instead of the bf16 ones: half the activation memory) and quantizes only the gradient;
one outlier, though, coarsens the whole tensor's grid.

scaling="block" (DeepSeek-V3's recipe): activations and gradients per 1 x 128 block along
each product's reduction dimension, weights per 128 x 128 block. A square block holds
along both of W's dimensions, so the backward's dX reuses the forward's fp8 W (saved
instead of the bf16 one); dW re-quantizes x in 128 x 128 blocks (its reduction runs over
tokens) and the gradient transposed in 1 x 128 blocks. An outlier coarsens 128 values, not
a row or a tensor.

Master weights, bias and the returned gradients stay in the parameters' dtype.

An epilogue ``activation`` and a ``residual`` (as tilesmith.nn.Linear's) run in the forward
GEMM's epilogue, which also stores the pre-activation (in the output's dtype) when a
gradient is needed; the backward multiplies the incoming gradient by act'(pre) (gemm's
activation backward, the bias gradient summed in the same pass) before quantizing it.

At inference (no gradient needed: torch.no_grad, torch.inference_mode, or parameters that
do not require one) the forward quantizes the weight once and reuses it while the weight
is unchanged, rather than at every call: a decoding step's matmul then reads the weight
once, in fp8, instead of reading it in bf16, writing it in fp8 and reading that again.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import backend as _backend
from ..backend import requested_backend
from ..ops.fp8 import SCALE_BLOCK, quantize_fp8, scaled_gemm, scaled_gemm_with_pre
from ..ops.gemm import activation_backward, activation_derivatives
from .modules import GEMM_ACTIVATIONS, _check_options, _options_repr


def _rowwise(t, dtype, backend):
    return quantize_fp8(t, dtype=dtype, granularity="row", backend=backend)


def _quantize_input(scaling, x2d, backend):
    """x (M, K) in e4m3 for the forward product: per row, per tensor, or per 1 x 128 block
    (the reduction runs along K)."""
    if scaling == "row":
        return _rowwise(x2d, torch.float8_e4m3fn, backend)
    if scaling == "tensor":
        return quantize_fp8(x2d, dtype=torch.float8_e4m3fn, granularity="tensor",
                            backend=backend)
    return _blocks(x2d, torch.float8_e4m3fn, backend)  # scales (M, K/128)


def _quantize_weight(scaling, weight, backend):
    """W (N, K) in e4m3 for the forward product: per output feature, per tensor, or per
    128 x 128 block (which holds along both dimensions, for the backward's dX too)."""
    if scaling == "row":
        return _rowwise(weight, torch.float8_e4m3fn, backend)
    if scaling == "tensor":
        return quantize_fp8(weight, dtype=torch.float8_e4m3fn, granularity="tensor",
                            backend=backend)
    return _blocks(weight, torch.float8_e4m3fn, backend, square=True)  # (N/128, K/128)


def _forward_product(x_q, x_s, w_q, w_s, bias, activation, residual, out_dtype, backend,
                     save_pre=False):
    """(activation(x W^T + bias) + residual, the pre-activation where save_pre) from the
    quantized operands (W's scales transposed with it), the epilogue in the GEMM's."""
    return scaled_gemm_with_pre(x_q, w_q.t(), x_s, w_s.t(), bias, activation, residual,
                                out_dtype, backend, save_pre)


def _save_epilogue(ctx, x_q, bias, residual, activation, backend):
    """What _epilogue_backward reads from ctx (the pre-activation, a tensor, is saved with
    the Function's others)."""
    ctx.activation = activation
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    # The backend the forward's product ran on computes act' too.
    ctx.product_backend = _backend.pick("fp8", x_q, backend) if activation else None


def _epilogue_backward(ctx, grad_out, pre):
    """(dz, bias gradient, residual gradient) from the output's gradient: dz = grad_out *
    act'(pre), the gradient of the product (grad_out itself without an activation; with
    one, in bfloat16 for an fp32 output, as gemm's activation backward writes it: it is
    quantized to e5m2 next), and the bias gradient its column sums, in fp32."""
    grad_out = grad_out.contiguous()
    bias_grad = ctx.needs_input_grad[2]
    grad_residual = grad_out.to(ctx.residual_dtype) if ctx.needs_input_grad[3] else None
    if ctx.activation is None:
        dz = grad_out
        sums = grad_out.sum(0, dtype=torch.float32) if bias_grad else None
    else:
        dz_dtype = (grad_out.dtype if grad_out.dtype in (torch.float16, torch.bfloat16)
                    else torch.bfloat16)
        if ctx.product_backend == "torch":
            derivative = activation_derivatives(pre.float(), ctx.activation)[0]
            dz32 = grad_out.float() * derivative
            dz, sums = dz32.to(dz_dtype), dz32.sum(0) if bias_grad else None
        else:
            dz, sums = activation_backward(grad_out, pre, ctx.activation, bias_grad,
                                           ctx.product_backend == "cuda", dz_dtype)
    grad_b = sums.to(ctx.bias_dtype) if bias_grad else None
    return dz, grad_b, grad_residual


# The weights quantized for inference forwards, by weight (by identity; an entry goes with
# its weight): (what it was quantized from, (w_q, w_s)).
_INFERENCE_WEIGHTS = WeakIdKeyDictionary()


def _inference_weight(weight, scaling, backend):
    """_quantize_weight's result, computed again only when the weight has changed: modified
    in place (its version counter), given new data (``.data =``, ``module.to``: its
    storage), or asked for with another scaling or backend."""
    key = (weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape),
           weight.stride(), scaling, backend)
    cached = _INFERENCE_WEIGHTS.get(weight)
    if cached is None or cached[0] != key:
        cached = key, _quantize_weight(scaling, weight, backend)
        _INFERENCE_WEIGHTS[weight] = cached
    return cached[1]


def _refuse_double_backward():
    """The backward's FP8 products (quantize_fp8, scaled_gemm) have no derivatives: under
    create_graph=True the gradients would lose their dependence on x and W without a word,
    so the double backward is refused instead."""
    if torch.is_grad_enabled():
        raise RuntimeError("Float8Linear has no double backward (create_graph=True, e.g. a "
                           "gradient penalty): its FP8 products have no derivatives of their "
                           "own. Use tilesmith.nn.Linear (gemm, which has them) for the "
                           "layers such a penalty differentiates through.")


class _Float8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, residual, activation, backend):
        ctx.backend = backend
        x_q, x_s = _quantize_input("row", x2d, backend)
        w_q, w_s = _quantize_weight("row", weight, backend)
        out, pre = _forward_product(x_q, x_s, w_q, w_s, bias, activation, residual, x2d.dtype,
                                    backend, save_pre=activation is not None)
        _save_epilogue(ctx, x_q, bias, residual, activation, backend)
        ctx.save_for_backward(x2d, weight, pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        backend = ctx.backend
        gemm = functools.partial(scaled_gemm, backend=backend)
        x2d, weight, pre = ctx.saved_tensors
        dz, grad_b, grad_residual = _epilogue_backward(ctx, grad_out, pre)
        e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = _rowwise(dz, e5m2, backend)              # (M, N), per row
            wt_q, wt_s = _rowwise(weight.t(), e4m3, backend)    # (K, N), per input feature
            grad_x = gemm(g_q, wt_q.t(), g_s, wt_s.t(), out_dtype=x2d.dtype)
        if ctx.needs_input_grad[1]:
            gt_q, gt_s = _rowwise(dz.t(), e5m2, backend)        # (N, M), per output feature
            xt_q, xt_s = _rowwise(x2d.t(), e4m3, backend)       # (K, M), per input feature
            grad_w = gemm(gt_q, xt_q.t(), gt_s, xt_s.t(), out_dtype=weight.dtype)
        return grad_x, grad_w, grad_b, grad_residual, None, None


class _Float8LinearTensorwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, residual, activation, backend):
        ctx.backend = backend
        x_q, x_s = _quantize_input("tensor", x2d, backend)
        w_q, w_s = _quantize_weight("tensor", weight, backend)  # (N, K)
        out, pre = _forward_product(x_q, x_s, w_q, w_s, bias, activation, residual, x2d.dtype,
                                    backend, save_pre=activation is not None)
        _save_epilogue(ctx, x_q, bias, residual, activation, backend)
        ctx.save_for_backward(x_q, x_s, w_q, w_s, pre)
        ctx.dtypes = (x2d.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        backend = ctx.backend
        gemm = functools.partial(scaled_gemm, backend=backend)
        x_q, x_s, w_q, w_s, pre = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dz, grad_b, grad_residual = _epilogue_backward(ctx, grad_out, pre)
        g_q, g_s = quantize_fp8(dz, dtype=torch.float8_e5m2, granularity="tensor",
                                backend=backend)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm(g_q, w_q, g_s, w_s, out_dtype=x_dtype)      # (M, K)
        if ctx.needs_input_grad[1]:
            grad_w = gemm(g_q.t(), x_q, g_s, x_s, out_dtype=w_dtype)  # (N, K)
        return grad_x, grad_w, grad_b, grad_residual, None, None


def _blocks(t, dtype, backend, square=False):
    """t quantized per 1 x 128 block along its rows, or per 128 x 128 block."""
    size = (SCALE_BLOCK, SCALE_BLOCK) if square else SCALE_BLOCK
    return quantize_fp8(t, dtype=dtype, granularity="block", block_size=size, backend=backend)


class _Float8LinearBlockwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, residual, activation, backend):
        ctx.backend = backend
        x_q, x_s = _quantize_input("block", x2d, backend)
        w_q, w_s = _quantize_weight("block", weight, backend)
        out, pre = _forward_product(x_q, x_s, w_q, w_s, bias, activation, residual, x2d.dtype,
                                    backend, save_pre=activation is not None)
        _save_epilogue(ctx, x_q, bias, residual, activation, backend)
        ctx.save_for_backward(x2d, w_q, w_s, pre)
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        backend = ctx.backend
        gemm = functools.partial(scaled_gemm, backend=backend)
        x2d, w_q, w_s, pre = ctx.saved_tensors
        dz, grad_b, grad_residual = _epilogue_backward(ctx, grad_out, pre)
        e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = _blocks(dz, e5m2, backend)                   # (M, N), (M, N/128)
            grad_x = gemm(g_q, w_q, g_s, w_s, out_dtype=x2d.dtype)  # W as (N, K)
        if ctx.needs_input_grad[1]:
            gt_q, gt_s = _blocks(dz.t(), e5m2, backend)             # (N, M), (N, M/128)
            xb_q, xb_s = _blocks(x2d, e4m3, backend, square=True)   # (M/128, K/128)
            grad_w = gemm(gt_q, xb_q, gt_s, xb_s, out_dtype=ctx.weight_dtype)
        return grad_x, grad_w, grad_b, grad_residual, None, None


_FUNCTIONS = {"row": _Float8LinearFunction, "tensor": _Float8LinearTensorwise,
              "block": _Float8LinearBlockwise}


class Float8Linear(torch.nn.Linear):
    """``torch.nn.Linear`` (same constructor, parameters and state_dict keys) whose forward
    and backward products run in FP8 with dynamic scaling, ``scaling="row"`` (default),
    ``"tensor"`` or ``"block"`` (module docstring), on ``backend`` (default: tilesmith's
    choice). Inputs of any leading shape; parameters in bf16/fp16/fp32. ``from_linear``
    converts an existing layer. As tilesmith.nn.Linear: an optional ``activation`` (gemm's:
    "relu", "gelu", "gelu_tanh", "silu", "relu6", "hardswish", "sigmoid", "hardsigmoid")
    after the bias and ``forward(x, residual)`` = ``layer(x) + residual``, both in the FP8
    GEMM's epilogue (the residual where it has the output's shape and dtype outside
    autocast, else added apart)."""

    ACTIVATIONS = GEMM_ACTIVATIONS
    backend: str | None = None  # (for modules made before it existed, e.g. unpickled)
    activation: str | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, scaling: str = "row", activation: str | None = None,
                 backend: str | None = None):
        if scaling not in _FUNCTIONS:
            raise ValueError(f"Float8Linear: scaling must be 'row', 'tensor' or 'block', "
                             f"got {scaling!r}")
        _check_options("Float8Linear", activation, self.ACTIVATIONS, backend)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.scaling = scaling
        self.activation = activation
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling}{_options_repr(self)}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Float8Linear: input has {x.shape[-1]} features, the layer "
                             f"expects {self.in_features} (input shape {tuple(x.shape)})")
        x2d = x.reshape(-1, self.in_features)
        out_shape = (*x.shape[:-1], self.out_features)
        device_type = x.device.type
        autocast = device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
        # The products run in fp8 and come out in the compute dtype: under torch.autocast
        # its dtype, as nn.Linear's output has it (the fp32 master weights quantized as they
        # are), else the weights' dtype.
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else self.weight.dtype
        if x2d.dtype != compute_dtype:
            x2d = x2d.to(compute_dtype)
        # As Linear's: under autocast torch's + promotes to the residual's dtype, added apart.
        fused = (isinstance(residual, torch.Tensor) and residual.shape == out_shape
                 and residual.dtype == compute_dtype and not autocast)
        residual2d = residual.reshape(-1, self.out_features) if fused else None
        backend = requested_backend(self.backend)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x2d, self.weight, self.bias, residual2d))
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            if needs_grad or torch.compiler.is_compiling():
                # The backend asked for now, kept for the backward: it may run after the
                # use_backend block, or in autograd's device thread, which has blocks of
                # its own. (Compiled graphs quantize the weight each call: the cache is
                # Python state that a graph cannot guard on.)
                out = _FUNCTIONS[self.scaling].apply(x2d, self.weight, self.bias, residual2d,
                                                     self.activation, backend)
            else:  # inference: the weight quantized once (module docstring)
                x_q, x_s = _quantize_input(self.scaling, x2d, backend)
                w_q, w_s = _inference_weight(self.weight, self.scaling, backend)
                out = _forward_product(x_q, x_s, w_q, w_s, self.bias, self.activation,
                                       residual2d, x2d.dtype, backend)[0]
        out = out.view(out_shape)
        return out + residual if residual is not None and not fused else out

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, scaling: str = "row",
                    activation: str | None = None, backend: str | None = None
                    ) -> "Float8Linear":
        """A Float8Linear with ``linear``'s weight and bias (copied). ``activation``:
        default ``linear``'s own (a tilesmith.nn.Linear's), so that the new layer computes
        what ``linear`` did."""
        if activation is None:
            activation = getattr(linear, "activation", None)
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype, scaling=scaling,
                  activation=activation, backend=backend)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new

"""Float8Linear: a drop-in for torch.nn.Linear that computes its three products in FP8.

Forward: x and W quantized to e4m3 with dynamic row-wise scales (per token, per output
feature), y = scaled_gemm(x, W^T) + bias. Backward: the incoming gradient quantized to
e5m2 (wider range, what gradients need), per row; each product re-quantizes its operands
along its own reduction dimension (W per input feature for dX, x per input feature and the
gradient per output feature for dW), so every scale is constant along the dimension summed.
Master weights, bias and the returned gradients stay in the parameters' dtype.
"""

from __future__ import annotations

import torch

from ..ops.fp8 import quantize_fp8, scaled_gemm


def _rowwise(t, dtype):
    return quantize_fp8(t, dtype=dtype, granularity="row")


class _Float8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias):
        e4m3 = torch.float8_e4m3fn
        x_q, x_s = _rowwise(x2d, e4m3)
        w_q, w_s = _rowwise(weight, e4m3)  # (N, K), scale per output feature
        out = scaled_gemm(x_q, w_q.t(), x_s, w_s.t(), bias=bias, out_dtype=x2d.dtype)
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight = ctx.saved_tensors
        e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = _rowwise(grad_out, e5m2)                    # (M, N), per row
            wt_q, wt_s = _rowwise(weight.t(), e4m3)                # (K, N), per input feature
            grad_x = scaled_gemm(g_q, wt_q.t(), g_s, wt_s.t(), out_dtype=x2d.dtype)
        if ctx.needs_input_grad[1]:
            gt_q, gt_s = _rowwise(grad_out.t(), e5m2)              # (N, M), per output feature
            xt_q, xt_s = _rowwise(x2d.t(), e4m3)                   # (K, M), per input feature
            grad_w = scaled_gemm(gt_q, xt_q.t(), gt_s, xt_s.t(), out_dtype=weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0, dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b


class Float8Linear(torch.nn.Linear):
    """``torch.nn.Linear`` (same constructor, parameters and state_dict keys) whose forward
    and backward products run in FP8 with dynamic scaling. Inputs of any leading shape;
    parameters in bf16/fp16/fp32. ``from_linear`` converts an existing layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Float8Linear: input has {x.shape[-1]} features, the layer "
                             f"expects {self.in_features} (input shape {tuple(x.shape)})")
        x2d = x.reshape(-1, self.in_features)
        if x2d.dtype != self.weight.dtype:
            x2d = x2d.to(self.weight.dtype)
        out = _Float8LinearFunction.apply(x2d, self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Float8Linear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new

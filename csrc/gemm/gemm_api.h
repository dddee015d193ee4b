#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace tilesmith {

// act(alpha * a @ b + bias) + residual for 2-D fp16/bf16 a, b (any strides); out_dtype is
// a's dtype or float32. Returns (out, pre-activation), the latter empty unless save_pre.
std::tuple<at::Tensor, at::Tensor> gemm_cuda(const at::Tensor& a, const at::Tensor& b,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& residual,
                                             c10::string_view activation, double alpha,
                                             at::ScalarType out_dtype, bool save_pre);

// The backward of a fused activation: (dz, bias gradient) with dz = grad * act'(pre) in
// dz_dtype (fp16/bf16; pre in that dtype or float32, grad in pre's dtype or float32), both
// 2-D of one shape, any strides; the bias gradient is dz summed over rows in fp32 (before
// dz's rounding) when bias_grad, else empty.
std::tuple<at::Tensor, at::Tensor> activation_backward_cuda(const at::Tensor& grad,
                                                            const at::Tensor& pre,
                                                            c10::string_view activation,
                                                            bool bias_grad,
                                                            at::ScalarType dz_dtype);

}  // namespace tilesmith

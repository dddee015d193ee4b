// tilesmith::gemm_cuda: the matmul kernel (csrc/matmul/) with its fused epilogue switched on;
// tilesmith::activation_backward_cuda: the elementwise part of its backward (and conv2d's).
// The schemas live in python/tilesmith/ops/gemm.py; registration.cpp binds these functions.
#include "gemm_api.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "../common/check.h"
#include "../matmul/matmul_api.h"
#include "activation_backward.h"

namespace tilesmith {

std::tuple<at::Tensor, at::Tensor> gemm_cuda(const at::Tensor& a, const at::Tensor& b,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& residual,
                                             c10::string_view activation, double alpha,
                                             at::ScalarType out_dtype, bool save_pre) {
  check_tensor_core_operands(a, b, "gemm");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "gemm: a and b must be 2-D, got shapes ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(out_dtype == a.scalar_type() || out_dtype == at::kFloat,
              "gemm (cuda backend): out_dtype must be the input dtype or float32, got ",
              out_dtype);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(b.size(0) == k, "gemm: inner dimensions differ: a ", a.sizes(), " @ b ", b.sizes());

  c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  // The pre-activation in the output's dtype (fp32 for an fp32 output, as the epilogue
  // computes it; python/tilesmith/ops/gemm.py's pre_activation_dtype).
  at::Tensor pre =
      at::empty({save_pre ? m : 0, save_pre ? n : 0}, a.options().dtype(out_dtype));
  if (poison_outputs()) {
    out.fill_(NAN);
    pre.fill_(NAN);
  }
  if (out.numel() == 0) return {out, pre};

  // Small operands of the epilogue in the layout the kernel reads: an fp32 bias, a residual
  // in the output dtype with unit column stride (copies only when they are not already).
  at::Tensor bias_f32, residual_out;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "gemm: bias must have shape (", n,
                "), got ", bias->sizes());
    TORCH_CHECK(bias->device() == a.device(), "gemm: bias is on ", bias->device());
    bias_f32 = bias->to(at::kFloat).contiguous();
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n,
                "gemm: residual must have shape (", m, ", ", n, "), got ", residual->sizes());
    TORCH_CHECK(residual->device() == a.device(), "gemm: residual is on ", residual->device());
    residual_out = residual->to(out_dtype);
    if (residual_out.stride(1) != 1) residual_out = residual_out.contiguous();
  }

  MatmulParams params{};
  params.a = a.data_ptr();
  params.b = b.data_ptr();
  params.c = out.data_ptr();
  params.batch = 1;
  params.m = m;
  params.n = n;
  params.k = k;
  params.a_row_stride = a.stride(0);
  params.a_col_stride = a.stride(1);
  params.b_row_stride = b.stride(0);
  params.b_col_stride = b.stride(1);
  params.c_row_stride = n;
  params.alpha = static_cast<float>(alpha);
  params.bias = bias.has_value() ? bias_f32.data_ptr<float>() : nullptr;
  if (residual.has_value()) {
    params.residual = residual_out.data_ptr();
    params.residual_row_stride = residual_out.stride(0);
  }
  if (save_pre) {
    params.pre = pre.data_ptr();
    params.pre_row_stride = n;
  }
  params.activation = parse_activation(activation, "gemm");
  params.out_fp32 = out_dtype == at::kFloat;

  launch_matmul(params, a);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor> activation_backward_cuda(const at::Tensor& grad,
                                                            const at::Tensor& pre,
                                                            c10::string_view activation,
                                                            bool bias_grad,
                                                            at::ScalarType dz_dtype) {
  TILESMITH_CHECK_CUDA_TENSOR(grad);
  TILESMITH_CHECK_CUDA_TENSOR(pre);
  TORCH_CHECK(grad.device() == pre.device(), "activation_backward: grad and pre must be on the ",
              "same device, got ", grad.device(), " and ", pre.device());
  TORCH_CHECK(pre.dim() == 2 && grad.sizes() == pre.sizes(), "activation_backward: grad and ",
              "pre must be 2-D of one shape, got ", grad.sizes(), " and ", pre.sizes());
  TORCH_CHECK(dz_dtype == at::kBFloat16 || dz_dtype == at::kHalf,
              "activation_backward (cuda backend): dz_dtype must be float16 or bfloat16, got ",
              dz_dtype);
  TORCH_CHECK(pre.scalar_type() == dz_dtype || pre.scalar_type() == at::kFloat,
              "activation_backward (cuda backend): pre must be float32 or dz_dtype (", dz_dtype,
              "), got ", pre.scalar_type());
  TORCH_CHECK(grad.scalar_type() == pre.scalar_type() || grad.scalar_type() == at::kFloat,
              "activation_backward (cuda backend): grad must be float32 or pre's dtype (",
              pre.scalar_type(), "), got ", grad.scalar_type());
  const int64_t m = pre.size(0), n = pre.size(1);

  c10::cuda::CUDAGuard guard(pre.device());
  at::Tensor dz = at::empty({m, n}, pre.options().dtype(dz_dtype));
  if (poison_outputs()) dz.fill_(NAN);
  const auto fp32 = pre.options().dtype(at::kFloat);
  if (dz.numel() == 0) return {dz, bias_grad ? at::zeros({n}, fp32) : at::empty({0}, fp32)};
  // One row of fp32 partial sums per block of rows, reduced below in a fixed order.
  const int64_t row_blocks = (m + kActivationBackwardRows - 1) / kActivationBackwardRows;
  at::Tensor partials = bias_grad ? at::empty({row_blocks, n}, fp32) : at::empty({0}, fp32);

  ActivationBackwardParams params{};
  params.grad = grad.data_ptr();
  params.pre = pre.data_ptr();
  params.dz = dz.data_ptr();
  params.bias_partials = bias_grad ? partials.data_ptr<float>() : nullptr;
  params.m = m;
  params.n = n;
  params.grad_row_stride = grad.stride(0);
  params.grad_col_stride = grad.stride(1);
  params.pre_row_stride = pre.stride(0);
  params.pre_col_stride = pre.stride(1);
  params.activation = parse_activation(activation, "activation_backward");
  params.dz_bf16 = dz_dtype == at::kBFloat16;
  params.grad_fp32 = grad.scalar_type() == at::kFloat;
  params.pre_fp32 = pre.scalar_type() == at::kFloat;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pre.device().index()).stream();
  TILESMITH_CHECK_LAUNCH(run_activation_backward(params, stream));
  return {dz, bias_grad ? at::sum(partials, 0) : partials};
}

}  // namespace tilesmith

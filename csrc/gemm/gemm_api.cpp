// tilesmith::gemm_cuda: the matmul kernel (csrc/matmul/) with its fused epilogue switched on.
// The schema lives in python/tilesmith/ops/gemm.py; registration.cpp binds this function.
#include "gemm_api.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "../matmul/matmul_api.h"

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
  at::Tensor pre = at::empty({save_pre ? m : 0, save_pre ? n : 0}, a.options());
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

}  // namespace tilesmith

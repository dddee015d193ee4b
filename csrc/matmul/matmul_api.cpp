// tilesmith::matmul_cuda: checks, device guard, output allocation and the MatmulParams fill.
// The schema lives in python/tilesmith/ops/matmul.py; registration.cpp binds this function
// to it for CUDA tensors.
#include "matmul_api.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>

#include "../common/check.h"
#include "../common/hopper_kernels.h"
#include "matmul.h"

namespace tilesmith {

void check_tensor_core_operands(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TILESMITH_CHECK_CUDA_TENSOR(a);
  TILESMITH_CHECK_CUDA_TENSOR(b);
  TORCH_CHECK(a.device() == b.device(), op, ": a and b must be on the same device, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf, op,
              " (cuda backend): dtype must be float16 or bfloat16, got ", a.scalar_type());
}

void launch_matmul(const MatmulParams& params, const at::Tensor& a) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  const HopperKernels* hopper = hopper_kernels();
  cudaError_t error = cudaSuccess;
  if (hopper == nullptr || !hopper->matmul(params, bf16, stream, &error)) {
    error = bf16 ? run_matmul_sm80_bf16(params, stream) : run_matmul_sm80_fp16(params, stream);
  }
  TILESMITH_CHECK_LAUNCH(error);
}

bool poison_outputs() { return std::getenv("TILESMITH_POISON_OUTPUTS") != nullptr; }

at::Tensor matmul_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_tensor_core_operands(a, b, "matmul");
  TORCH_CHECK(a.dim() == b.dim() && (a.dim() == 2 || a.dim() == 3),
              "matmul_cuda: a and b must both be 2-D or both 3-D, got shapes ", a.sizes(), " and ",
              b.sizes());
  const bool batched = a.dim() == 3;
  const int64_t batch = batched ? a.size(0) : 1;
  TORCH_CHECK(!batched || b.size(0) == batch, "matmul_cuda: batch sizes differ: a ", a.sizes(),
              ", b ", b.sizes());
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  TORCH_CHECK(b.size(-2) == k, "matmul: inner dimensions differ: a ", a.sizes(), " @ b ",
              b.sizes());

  c10::cuda::CUDAGuard guard(a.device());
  at::Tensor c = batched ? at::empty({batch, m, n}, a.options()) : at::empty({m, n}, a.options());
  if (poison_outputs()) c.fill_(NAN);
  if (c.numel() == 0) return c;

  MatmulParams params{};
  params.a = a.data_ptr();
  params.b = b.data_ptr();
  params.c = c.data_ptr();
  params.batch = batch;
  params.m = m;
  params.n = n;
  params.k = k;
  params.a_batch_stride = batched ? a.stride(0) : 0;
  params.a_row_stride = a.stride(-2);
  params.a_col_stride = a.stride(-1);
  params.b_batch_stride = batched ? b.stride(0) : 0;
  params.b_row_stride = b.stride(-2);
  params.b_col_stride = b.stride(-1);
  params.c_batch_stride = m * n;
  params.c_row_stride = n;

  launch_matmul(params, a);
  return c;
}

}  // namespace tilesmith

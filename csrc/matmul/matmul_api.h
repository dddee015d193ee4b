#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "matmul.h"

namespace tilesmith {

// Shared by matmul_cuda and gemm_cuda (one kernel behind both):
// a and b are CUDA tensors on one device with one dtype, float16 or bfloat16.
void check_tensor_core_operands(const at::Tensor& a, const at::Tensor& b, const char* op);
// Runs the kernel for a's dtype on the current stream of a's device: the Hopper kernels
// where they take the call (common/hopper_kernels.h), else the sm_80 ones.
void launch_matmul(const MatmulParams& params, const at::Tensor& a);
// The epilogue activation named in an op's schema ("none", "relu", "gelu", "gelu_tanh",
// "silu", "relu6", "hardswish"); `op` names the op in the error for any other name.
Activation parse_activation(c10::string_view name, const char* op);
// Test hook (tilesmith.testing.poison_outputs): outputs start NaN-filled, so an element
// the kernel fails to write is visible.
bool poison_outputs();

// a: (m, k) or (batch, m, k); b: (k, n) or (batch, k, n); any strides, fp16 or bf16.
at::Tensor matmul_cuda(const at::Tensor& a, const at::Tensor& b);

}  // namespace tilesmith

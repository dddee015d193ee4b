#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>

#include "matmul.h"

namespace tilesmith {

// Shared by matmul_cuda and gemm_cuda (one kernel behind both):
// a and b are CUDA tensors on one device with one dtype, float16 or bfloat16.
void check_tensor_core_operands(const at::Tensor& a, const at::Tensor& b, const char* op);
// Runs the kernel for a's dtype on the current stream of a's device: the Hopper kernels
// where they take the call (common/hopper_kernels.h), else the sm_80 ones.
void launch_matmul(const MatmulParams& params, const at::Tensor& a);
// The epilogue activation named in an op's schema ("none", "relu", "gelu", "gelu_tanh",
// "silu", "relu6", "hardswish", "sigmoid", "hardsigmoid"); `op` names the op in the error
// for any other name.
// Inline: tilesmith._C_sm90a (scaled_gemm's epilogue) reads these names too.
inline Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "relu6") return Activation::kRelu6;
  if (name == "hardswish") return Activation::kHardswish;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "hardsigmoid") return Activation::kHardsigmoid;
  TORCH_CHECK(false, op, ": activation must be none, relu, gelu, gelu_tanh, silu, relu6, "
              "hardswish, sigmoid or hardsigmoid, got ", std::string(name));
}

// Test hook (tilesmith.testing.poison_outputs): outputs start NaN-filled, so an element
// the kernel fails to write is visible.
bool poison_outputs();

// a: (m, k) or (batch, m, k); b: (k, n) or (batch, k, n); any strides, fp16 or bf16.
at::Tensor matmul_cuda(const at::Tensor& a, const at::Tensor& b);

}  // namespace tilesmith

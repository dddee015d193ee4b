#pragma once

#include <ATen/core/Tensor.h>

namespace tilesmith {

// a: (m, k) or (batch, m, k); b: (k, n) or (batch, k, n); any strides, fp16 or bf16.
at::Tensor matmul_cuda(const at::Tensor& a, const at::Tensor& b);

}  // namespace tilesmith

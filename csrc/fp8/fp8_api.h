#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace tilesmith {

// (a * scale_a) @ (b * scale_b) + bias on sm_90 (wgmma): a (m, k) and b (k, n) in float8
// (e4m3fn or e5m2), k a multiple of 16. scale_*_kind: 0 per tensor, 1 per row of a / column
// of b, 2 per block (both operands). b is read as b^T (n, k): a column-major b costs no
// copy. out_dtype: bfloat16, float16 or float32.
at::Tensor scaled_gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                            const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype, int64_t scale_a_kind,
                            int64_t scale_b_kind);

}  // namespace tilesmith

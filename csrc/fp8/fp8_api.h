#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace tilesmith {

// (q, scale) with x ~ q * scale: x (m, k) bfloat16/float16/float32, any strides; q (m, k)
// contiguous in `dtype` (float8_e4m3fn or float8_e5m2). granularity: 0 per tensor (scale ()),
// 1 per row ((m, 1)), 2 per 1 x block_k piece of a row ((m, ceil(k/block_k))), 3 per
// block_m x block_k tile ((ceil(m/block_m), ceil(k/block_k))).
std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, at::ScalarType dtype,
                                                     int64_t granularity, int64_t block_m,
                                                     int64_t block_k);

// (out, pre): out = act((a * scale_a) @ (b * scale_b) + bias) + residual on sm_90 (wgmma),
// pre the part inside act when save_pre (else empty): a (m, k) and b (k, n) in float8
// (e4m3fn or e5m2). scale_*_kind: 0 per tensor, 1 per row of a / column of b, 2 per block
// (both operands). b is read as b^T (n, k): a column-major b with k a multiple of 16 costs
// no copy (other k are zero-padded by a copy). out_dtype (also pre's, and the residual is
// read in it): bfloat16, float16 or float32. activation: as gemm's ("none", "relu", ...).
std::tuple<at::Tensor, at::Tensor> scaled_gemm_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
    const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, c10::string_view activation,
    at::ScalarType out_dtype, int64_t scale_a_kind, int64_t scale_b_kind, bool save_pre);

}  // namespace tilesmith

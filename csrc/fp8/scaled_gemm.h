// The plain interface between fp8_api.cpp (which sees ATen) and the sm_90a kernel files.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../matmul/matmul.h"  // Activation

namespace tilesmith {

// How a scale applies: one for the whole operand, one per row of a (per column of b), or
// one per 1x128 block of a ((m, ceil(k/128)) scales) and 128x128 block of b
// ((ceil(k/128), ceil(n/128)) scales).
enum class ScaleKind : int { kTensor = 0, kRow = 1, kBlock = 2 };
enum class OutDtype : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

// out = act((a * scale_a) @ (b * scale_b) + bias) + residual, fp32 accumulation; the
// epilogue fields at their defaults give the plain scaled product.
struct ScaledGemmParams {
  const void* a;  // (m, k) fp8, k contiguous, row stride a_row_stride (a multiple of 16)
  const void* b;  // b^T: (n, k) fp8, k contiguous, row stride b_row_stride (a multiple of 16)
  void* out;      // (m, n), row stride n
  const float* scale_a;
  const float* scale_b;
  const float* bias = nullptr;  // (n,) fp32
  int64_t m, n, k;
  int64_t a_row_stride, b_row_stride;
  ScaleKind scale_a_kind, scale_b_kind;  // per-block: both or neither
  int64_t scale_a_row_stride;            // per-block scales: ceil(k/128)
  int64_t scale_b_row_stride;            // per-block scales: ceil(n/128)
  OutDtype out_dtype;

  Activation activation = Activation::kNone;
  const void* residual = nullptr;  // (m, n) in out_dtype, unit column stride
  int64_t residual_row_stride = 0;
  void* pre = nullptr;  // the scaled product + bias before act, (m, n) in out_dtype: for the
                        // backward's act' (Float8Linear)
};

// a_e5m2 / b_e5m2: the fp8 formats of a and b (e4m3fn otherwise).
cudaError_t run_scaled_gemm_sm90a_a_e4m3(const ScaledGemmParams& params, bool b_e5m2,
                                         cudaStream_t stream);
cudaError_t run_scaled_gemm_sm90a_a_e5m2(const ScaledGemmParams& params, bool b_e5m2,
                                         cudaStream_t stream);

}  // namespace tilesmith

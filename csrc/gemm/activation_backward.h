// The plain interface between gemm_api.cpp and activation_backward.cu: the backward of a
// fused activation (gemm's and conv2d's), dz = grad * act'(pre), with the bias gradient
// (dz summed over rows) reduced in the same pass over memory.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../matmul/matmul.h"

namespace tilesmith {

// Rows per block. Each block writes one row of bias partial sums, so the workspace is
// ceil(m / kActivationBackwardRows) x n floats: 1/64 of an fp16 dz.
constexpr int kActivationBackwardRows = 128;

// dz[i][j] = grad[i][j] * act'(pre[i][j]) for i < m, j < n, computed in fp32 and stored
// contiguous (row stride n) in fp16 or bf16, the GEMM inputs' dtype. pre is in that dtype
// or, from a gemm with an fp32 output, in fp32 (grad then too). With bias_partials set, also
// bias_partials[r][j] = the sum over block r's rows of the fp32 products (before rounding).
struct ActivationBackwardParams {
  const void* grad;
  const void* pre;
  void* dz;
  float* bias_partials;  // nullptr: no bias gradient
  int64_t m, n;
  int64_t grad_row_stride, grad_col_stride;
  int64_t pre_row_stride, pre_col_stride;
  Activation activation;
  bool dz_bf16;     // dz: bfloat16, else float16
  bool grad_fp32;   // grad: float32, else dz's dtype
  bool pre_fp32;    // pre: float32 (grad_fp32 too), else dz's dtype
};

cudaError_t run_activation_backward(const ActivationBackwardParams& params, cudaStream_t stream);

}  // namespace tilesmith

// The plain interface between matmul_api.cpp (which sees ATen) and the kernel files (which
// see only this header and CUDA's). Strides are in elements and 64-bit, so a kernel can read
// transposed, sliced and broadcast (stride 0) views without a copy.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tilesmith {

// The epilogue's activation; the numbering is kernels/gemm.py's ACTIVATIONS.
enum class Activation : int {
  kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kRelu6 = 5, kHardswish = 6,
  kSigmoid = 7, kHardsigmoid = 8
};

// c[z] = act(alpha * (a[z] @ b[z]) + bias) + residual[z] for z in [0, batch): a[z] is m x k,
// b[z] is k x n, c[z] is m x n; or, with residual_before_activation (conv2d's epilogue, a
// ResNet block's relu(conv + identity)), c[z] = act(alpha * (a[z] @ b[z]) + bias + residual[z]).
// With the epilogue fields at their defaults, the plain product.
struct MatmulParams {
  const void* a;
  const void* b;
  void* c;
  int64_t batch, m, n, k;
  int64_t a_batch_stride, a_row_stride, a_col_stride;  // a[z][i][p]
  int64_t b_batch_stride, b_row_stride, b_col_stride;  // b[z][p][j]
  int64_t c_batch_stride, c_row_stride;                // c[z][i][j], unit column stride

  // Epilogue, in fp32 on the accumulators.
  float alpha = 1.0f;
  const float* bias = nullptr;           // (n,)
  const void* residual = nullptr;        // like c, unit column stride
  int64_t residual_batch_stride = 0, residual_row_stride = 0;
  void* pre = nullptr;                   // alpha * acc + bias (+ residual, added before the
  int64_t pre_batch_stride = 0, pre_row_stride = 0;  // activation) in c's dtype: the
  Activation activation = Activation::kNone;         // backward's act' reads it
  bool out_fp32 = false;                 // c and residual are float, not a's dtype
  bool residual_before_activation = false;
};

// fp32 accumulation; each returns the launch's error code.
cudaError_t run_matmul_sm80_bf16(const MatmulParams& params, cudaStream_t stream);
cudaError_t run_matmul_sm80_fp16(const MatmulParams& params, cudaStream_t stream);

// The wgmma kernels, in tilesmith._C_sm90a (see common/hopper_kernels.h): c in the input
// dtype, and (_fp32_out) c in fp32. tma: matmul_tma_sm90a.cuh's kernel where the TMA can
// read the operands, else (and with tma false) matmul_sm90a.cuh's cp.async one.
cudaError_t run_matmul_sm90a_bf16(const MatmulParams& params, bool tma, cudaStream_t stream);
cudaError_t run_matmul_sm90a_fp16(const MatmulParams& params, bool tma, cudaStream_t stream);
cudaError_t run_matmul_sm90a_bf16_fp32_out(const MatmulParams& params, bool tma,
                                           cudaStream_t stream);
cudaError_t run_matmul_sm90a_fp16_fp32_out(const MatmulParams& params, bool tma,
                                           cudaStream_t stream);

}  // namespace tilesmith

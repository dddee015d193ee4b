// The plain interface between matmul_api.cpp (which sees ATen) and the kernel files (which
// see only this header and CUDA's). Strides are in elements and 64-bit, so a kernel can read
// transposed, sliced and broadcast (stride 0) views without a copy.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tilesmith {

// c[z] = a[z] @ b[z] for z in [0, batch): a[z] is m x k, b[z] is k x n, c[z] is m x n.
struct MatmulParams {
  const void* a;
  const void* b;
  void* c;
  int64_t batch, m, n, k;
  int64_t a_batch_stride, a_row_stride, a_col_stride;  // a[z][i][p]
  int64_t b_batch_stride, b_row_stride, b_col_stride;  // b[z][p][j]
  int64_t c_batch_stride, c_row_stride;                // c[z][i][j], unit column stride
};

// fp32 accumulation; each returns the launch's error code.
cudaError_t run_matmul_sm80_bf16(const MatmulParams& params, cudaStream_t stream);
cudaError_t run_matmul_sm80_fp16(const MatmulParams& params, cudaStream_t stream);

}  // namespace tilesmith

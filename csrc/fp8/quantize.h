// The plain interface between fp8_api.cpp (which sees ATen) and the quantization kernels.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tilesmith {

// One scale per tensor, per row, per 1 x block_k piece of a row, or per block_m x block_k
// tile (numbered as python/tilesmith/ops/fp8.py's _GRANULARITY).
enum class Granularity : int { kTensor = 0, kRow = 1, kBlock = 2, kBlock2d = 3 };
enum class QuantizeInput : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

// q = saturate(x * (FP8_MAX / amax)) and scale = amax / FP8_MAX per group.
struct QuantizeParams {
  const void* x;  // (m, k), any strides
  int64_t m, k;
  int64_t x_row_stride, x_col_stride;
  void* q;         // (m, k) fp8, contiguous
  float* scale;    // contiguous: () | (m,) | (m, ceil(k/block_k)) | (ceil(m/block_m), ...)
  int64_t scale_row_stride;  // block scales: ceil(k / block_k)
  float* amax;     // per-tensor scaling: a zeroed float the first kernel reduces into
  Granularity granularity;
  int block_m, block_k;  // powers of two >= 16 (block_m only for kBlock2d)
  QuantizeInput input;
  bool e5m2;  // float8_e5m2 (else float8_e4m3fn)
};

// Whether the kernels read a column-major x (unit row stride: each of x's rows is a column
// in memory, as Float8Linear's backward quantizes transposed operands) in place, in tiles
// transposed through shared memory: 16-bit x, per-tensor, per-row or 1 x block_k scales,
// 16-byte aligned columns (m and the column stride multiples of 8) and k a multiple of 16.
// Otherwise the caller makes such an x row-major first.
inline bool quantizes_column_major(const QuantizeParams& p) {
  return p.input != QuantizeInput::kFloat32 && p.granularity != Granularity::kBlock2d &&
         p.x_row_stride == 1 && p.x_col_stride % 8 == 0 && p.m % 8 == 0 && p.k % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
}

cudaError_t run_quantize_fp8_sm90a(const QuantizeParams& params, cudaStream_t stream);

}  // namespace tilesmith

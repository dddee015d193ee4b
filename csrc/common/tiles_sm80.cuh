// Shared-memory tiles for the sm_80 tensor-core kernels: the swizzled layout ldmatrix reads
// without bank conflicts, and the global -> shared copy that fills it (cp.async, or
// element-wise loads for views cp.async cannot read). Shared by matmul/gemm and attention.
#pragma once

#include <cstdint>

#include "mma_sm80.cuh"

namespace tilesmith {

// A shared-memory tile of kRows x kCols 16-bit elements, stored row by row. The 16-byte
// chunks of each row are permuted by XOR with (row % 8): the 8 rows one ldmatrix phase reads
// (same logical chunk) then land in 8 different bank groups, and so do the 8 chunks that 8
// neighbouring threads write with cp.async. kCols must be a multiple of 64.
template <int kRows, int kCols>
struct SwizzledTile {
  static_assert(kCols % 64 == 0, "rows must hold a whole number of 8-chunk swizzle groups");
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kElements = kRows * kCols;

  __device__ __forceinline__ static int offset(int row, int col) {
    const int chunk = col >> 3;
    const int swizzled = chunk ^ (row & 7);
    return row * kCols + (swizzled << 3) + (col & 7);
  }
};

// Global -> shared copy of one operand tile by a block of kThreads threads. The tile's rows
// follow the operand's strided dimension and its columns the contiguous one, so (row, col)
// in the tile is element (row0 + row, col0 + col) of a rows x cols matrix with the given
// strides; elements outside it are zero-filled. Each thread copies one 8-element chunk
// column, kRowsPerPass rows apart: its column bounds and swizzle are computed once, and the
// loop only steps a pointer (the first version recomputed the 64-bit address per chunk and
// needed 175 registers instead of 128 in the matmul kernel).
template <typename T, int kRows, int kCols, int kThreads, bool kVectorLoads>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row0, int64_t col0,
                                          int64_t rows, int64_t cols, int64_t row_stride,
                                          int64_t col_stride) {
  using Tile = SwizzledTile<kRows, kCols>;
  constexpr int kRowsPerPass = kThreads / Tile::kChunksPerRow;
  static_assert(kThreads % Tile::kChunksPerRow == 0, "whole rows per pass");
  static_assert(kRows % kRowsPerPass == 0, "every thread copies the same number of chunks");
  static_assert(kRowsPerPass % 8 == 0, "the swizzle pattern must repeat between passes");
  const int row = threadIdx.x / Tile::kChunksPerRow;
  const int col = (threadIdx.x % Tile::kChunksPerRow) * 8;
  const int64_t gcol = col0 + col;
  const int64_t left = cols - gcol;
  const int valid_cols = left <= 0 ? 0 : (left < 8 ? static_cast<int>(left) : 8);
  T* dst = smem + Tile::offset(row, col);
  const T* src = gmem + (row0 + row) * row_stride + gcol * col_stride;
  int64_t rows_left = rows - row0 - row;
#pragma unroll(kVectorLoads ? kRows / kRowsPerPass : 1)
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int valid = rows_left > 0 ? valid_cols : 0;
    if constexpr (kVectorLoads) {
      // With nothing to read the source address is the (valid) base pointer.
      cp_async_16(dst, valid > 0 ? src : gmem, valid * 2);
    } else {
      alignas(16) T values[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) values[j] = j < valid ? src[j * col_stride] : from_float<T>(0.0f);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(values);
    }
    dst += kRowsPerPass * kCols;
    src += kRowsPerPass * row_stride;
    rows_left -= kRowsPerPass;
  }
}

}  // namespace tilesmith

// Shared-memory tiles for the tensor-core kernels: the swizzled layout ldmatrix reads
// without bank conflicts, the global -> shared copy that fills it (cp.async, or element-wise
// loads for views cp.async cannot read), the mma.sync operand fragments read from it, and the
// grouped block order. Shared by matmul/gemm, conv2d, attention and the FP8 GEMM.
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
// needed 175 registers instead of 128 in the matmul kernel). Rows wider than the block has
// threads for 8 rows per pass (256 columns, 128 threads: 4 rows) change swizzle between
// passes, so there the shared-memory offset is recomputed each pass.
template <typename T, int kRows, int kCols, int kThreads, bool kVectorLoads>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row0, int64_t col0,
                                          int64_t rows, int64_t cols, int64_t row_stride,
                                          int64_t col_stride) {
  using Tile = SwizzledTile<kRows, kCols>;
  constexpr int kRowsPerPass = kThreads / Tile::kChunksPerRow;
  static_assert(kThreads % Tile::kChunksPerRow == 0, "whole rows per pass");
  static_assert(kRows % kRowsPerPass == 0, "every thread copies the same number of chunks");
  static_assert(kRowsPerPass % 8 == 0 || 8 % kRowsPerPass == 0, "whole swizzle periods");
  const int row = threadIdx.x / Tile::kChunksPerRow;
  const int col = (threadIdx.x % Tile::kChunksPerRow) * 8;
  const int64_t gcol = col0 + col;
  const int64_t left = cols - gcol;
  const int valid_cols = left <= 0 ? 0 : (left < 8 ? static_cast<int>(left) : 8);
  T* dst = smem + Tile::offset(row, col);  // pass 0
  const T* src = gmem + (row0 + row) * row_stride + gcol * col_stride;
  int64_t rows_left = rows - row0 - row;
#pragma unroll(kVectorLoads ? kRows / kRowsPerPass : 1)
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    if constexpr (kRowsPerPass % 8 != 0) dst = smem + Tile::offset(row + pass * kRowsPerPass, col);
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

// How many kBlockM x kBlockN tiles cover an m x n output.
template <int kBlockM, int kBlockN>
__host__ __device__ __forceinline__ int64_t tile_count(int64_t m, int64_t n) {
  return ((m + kBlockM - 1) / kBlockM) * ((n + kBlockN - 1) / kBlockN);
}

// Grouped block order: consecutive blocks walk down kGroupM block rows before moving right,
// so the B tiles they share are still in L2. Block `block` of an m x n output gets the tile
// whose first row and column are returned.
template <int kBlockM, int kBlockN, int kGroupM>
__device__ __forceinline__ void grouped_block_tile(int64_t m, int64_t n, int block,
                                                   int64_t& block_m0, int64_t& block_n0) {
  const int tiles_m = static_cast<int>((m + kBlockM - 1) / kBlockM);
  const int tiles_n = static_cast<int>((n + kBlockN - 1) / kBlockN);
  const int blocks_per_group = kGroupM * tiles_n;
  const int first_tile_m = (block / blocks_per_group) * kGroupM;
  const int group_rows = min(tiles_m - first_tile_m, kGroupM);
  const int tile_m = first_tile_m + (block % blocks_per_group) % group_rows;
  const int tile_n = (block % blocks_per_group) / group_rows;
  block_m0 = static_cast<int64_t>(tile_m) * kBlockM;
  block_n0 = static_cast<int64_t>(tile_n) * kBlockN;
}

// Operand fragments of one mma.sync m16n8k16 from a swizzled tile. ldmatrix.x4 reads four
// 8x8 matrices; lane l gives the address of row l % 8 of matrix l / 8.

// A (16 rows x 16 k) at (row0, k0) of a tile stored [row][k]. Matrices: (rows 0-7, k 0-7),
// (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
template <typename Tile, typename T>
__device__ __forceinline__ void load_fragment_a(uint32_t (&frag)[4], const T* tile, int row0,
                                                int k0, int lane) {
  const int row = row0 + lane % 8 + ((lane / 8) % 2) * 8;
  const int col = k0 + (lane / 16) * 8;
  ldmatrix_x4(frag, tile + Tile::offset(row, col));
}

// B for two n-tiles (n0..n0+7 in regs 0-1, n0+8..n0+15 in regs 2-3) x 16 k at k0, from a
// tile stored [n][k]: the column-major B that mma wants, no transpose.
template <typename Tile, typename T>
__device__ __forceinline__ void load_fragments_b_nk(uint32_t (&regs)[4], const T* tile, int n0,
                                                    int k0, int lane) {
  const int row = n0 + lane % 8 + (lane / 16) * 8;
  const int col = k0 + ((lane / 8) % 2) * 8;
  ldmatrix_x4(regs, tile + Tile::offset(row, col));
}

// The same two B n-tiles from a tile stored [k][n], transposed on the way by ldmatrix.
template <typename Tile, typename T>
__device__ __forceinline__ void load_fragments_b_kn(uint32_t (&regs)[4], const T* tile, int k0,
                                                    int n0, int lane) {
  const int row = k0 + lane % 8 + ((lane / 8) % 2) * 8;
  const int col = n0 + (lane / 16) * 8;
  ldmatrix_x4_trans(regs, tile + Tile::offset(row, col));
}

// Accumulator tiles 2i and 2i + 1 of a row of m16n8 fp32 tiles, rounded to T: the A fragment
// of k-step i of the next product (how P and dS stay in registers).
template <typename T>
__device__ __forceinline__ void accumulators_to_fragment_a(uint32_t (&frag)[4],
                                                           const float (&left)[4],
                                                           const float (&right)[4]) {
  frag[0] = pack_pair<T>(left[0], left[1]);
  frag[1] = pack_pair<T>(left[2], left[3]);
  frag[2] = pack_pair<T>(right[0], right[1]);
  frag[3] = pack_pair<T>(right[2], right[3]);
}

}  // namespace tilesmith

// Shared-memory tiles in the 128-byte swizzle that wgmma's matrix descriptors read
// (wgmma_sm90a.cuh), the cp.async copy that fills them, and the pipeline that overlaps the
// two. Shared by the FP8 GEMM and the Hopper matmul/conv2d.
#pragma once

#include <cstdint>

#include "mma_sm80.cuh"
#include "wgmma_sm90a.cuh"

namespace tilesmith {

constexpr int kSwizzleRowBytes = 128;

// The 1024-byte aligned start of the dynamic shared memory (the kernels ask for 1024
// bytes of slack): the swizzle pattern is a function of the address bits 4-9.
__device__ __forceinline__ uint8_t* aligned_shared(unsigned char* shared_bytes) {
  const uint32_t misalignment = shared_address(shared_bytes) & 1023;
  return shared_bytes + ((1024 - misalignment) & 1023);
}

// Byte offset of (row, byte) in a block of 128-byte rows in the 128-byte swizzle: the
// 16-byte chunks of row r permuted by XOR with (r % 8), the block 1024-byte aligned.
__device__ __forceinline__ int swizzled_offset(int row, int byte) {
  return row * kSwizzleRowBytes + ((((byte >> 4) ^ row) & 7) << 4) + (byte & 15);
}

// One stage's tile of a matrix whose unit stride runs along its columns: rows [row0, row0 +
// kRows) x the 128 bytes of columns from col0, kColBlocks times over, of a rows x cols
// matrix. Stored as kColBlocks blocks of kRows swizzled 128-byte rows (block j holds the
// j-th 128 bytes of columns). Out-of-range elements are zero-filled. Consecutive threads of
// the block's kThreads take consecutive 16-byte pieces of a row. The caller guarantees
// 16-byte aligned rows (a 16-byte aligned matrix, row_stride a multiple of 16 bytes).
template <typename T, int kThreads, int kRows, int kColBlocks>
__device__ __forceinline__ void load_swizzled_tile(uint8_t* tile, const T* matrix, int64_t row0,
                                                   int64_t rows, int64_t col0, int64_t cols,
                                                   int64_t row_stride) {
  constexpr int kPieceElements = 16 / static_cast<int>(sizeof(T));
  constexpr int kPiecesPerRow = kColBlocks * (kSwizzleRowBytes / 16);
  constexpr int kRowsPerPass = kThreads / kPiecesPerRow;
  static_assert(kRows % kRowsPerPass == 0, "whole passes");
  const int piece = threadIdx.x % kPiecesPerRow;
  const int64_t col = col0 + piece * kPieceElements;
  const int64_t left = cols - col;
  const int valid_bytes =
      left <= 0 ? 0 : (left < kPieceElements ? static_cast<int>(left * sizeof(T)) : 16);
  uint8_t* block = tile + (piece / 8) * kRows * kSwizzleRowBytes;
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int r = threadIdx.x / kPiecesPerRow + pass * kRowsPerPass;
    const bool ok = valid_bytes > 0 && row0 + r < rows;
    const T* src = matrix + (row0 + r) * row_stride + col;
    cp_async_16(block + swizzled_offset(r, (piece % 8) * 16), ok ? src : matrix,
                ok ? valid_bytes : 0);
  }
}

// The K loop of a wgmma kernel over k_tiles steps in kStages shared-memory stages.
// load_stage(stage, kt) issues the cp.async copies of step kt into `stage`; compute(stage,
// kt) issues step kt's wgmma and must leave at most one wgmma group in flight when it
// returns (wgmma_wait<1>). Loads run kPrefetch = kStages - 2 steps ahead, so the stage
// being refilled held step kt - 2, whose wgmma every warpgroup retired (by that wait, at the
// end of step kt - 1) before the barrier of step kt. Returns with every wgmma retired and
// every copy landed.
template <int kStages, typename LoadStage, typename Compute>
__device__ __forceinline__ void run_wgmma_pipeline(int k_tiles, LoadStage&& load_stage,
                                                   Compute&& compute) {
  constexpr int kPrefetch = kStages - 2;
  // A commit per step even when there is nothing to load keeps the group count, and so
  // the wait below, uniform.
#pragma unroll
  for (int s = 0; s < kPrefetch; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kPrefetch - 1>();  // this thread's copies of step kt have landed
    fence_proxy_async_shared();      // ... and are visible to wgmma's (async proxy) reads
    __syncthreads();  // everyone's; and no wgmma still reads step kt - 2's stage
    const int next = kt + kPrefetch;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();
    compute(kt % kStages, kt);
  }
  wgmma_wait<0>();
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits
}

}  // namespace tilesmith

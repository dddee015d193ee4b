// The matmul kernel's tensor-core main loop and epilogue, shared with conv2d's implicit
// GEMMs (csrc/conv2d/): a cp.async multi-stage pipeline into swizzled shared memory,
// ldmatrix into registers, mma.sync m16n8k16 with fp32 accumulators, and the fused
// epilogue (epilogue.cuh: alpha, bias, activation, residual, optional pre-activation copy).
//
// Each operand tile keeps its global layout in shared memory (the "contiguous dimension" is
// a template parameter) and ldmatrix's .trans form turns it around on the way into
// registers, so a transposed operand costs nothing. What fills a stage is the caller's:
// a strided matrix for matmul, a gather through the convolution's geometry for conv2d.
#pragma once

#include <type_traits>

#include "../common/mma_sm80.cuh"
#include "../common/tiles_sm80.cuh"
#include "epilogue.cuh"
#include "matmul.h"

namespace tilesmith {
namespace matmul_sm80 {

// 128x128 block tile, 64-deep K slices, 8 warps as 2 (M) x 4 (N), each warp 64x32.
// 3 stages x 32 KiB of shared memory = 96 KiB, so two blocks fit on an H100 SM (227 KiB)
// and one on an A100 (163 KiB).
constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 64;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kStages = 3;
constexpr int kThreads = kWarpsM * kWarpsN * 32;
constexpr int kWarpTileM = kBlockM / kWarpsM;  // 64
constexpr int kWarpTileN = kBlockN / kWarpsN;  // 32
constexpr int kMmaTilesM = kWarpTileM / 16;    // 4
constexpr int kMmaTilesN = kWarpTileN / 8;     // 4
constexpr int kGroupM = 8;                     // block rows that share B tiles in L2
// Two blocks share an H100 SM (2 x 96 KiB of shared memory) only if each thread holds at
// most 65536 / (2 * kThreads) = 128 registers. conv2d's kernels ask for that in their
// __launch_bounds__ (left to itself ptxas gave dgrad's phase arithmetic 174); the matmul
// kernel fits unasked, and asking costs it spills.
constexpr int kBlocksPerSm = 2;

template <typename T>
constexpr int smem_bytes() {
  return kStages * (kBlockM + kBlockN) * kBlockK * static_cast<int>(sizeof(T));
}

// Grouped block order (common/tiles_sm80.cuh) for this kernel's tile.
__device__ __forceinline__ void grouped_block_tile(int64_t m, int64_t n, int block,
                                                   int64_t& block_m0, int64_t& block_n0) {
  tilesmith::grouped_block_tile<kBlockM, kBlockN, kGroupM>(m, n, block, block_m0, block_n0);
}

// One stage's operand tiles. A: [m][k] when k-contiguous, else [k][m]; B: [k][n] when
// n-contiguous, else [n][k].
template <bool kAKContiguous>
using TileA = std::conditional_t<kAKContiguous, SwizzledTile<kBlockM, kBlockK>,
                                 SwizzledTile<kBlockK, kBlockM>>;
template <bool kBNContiguous>
using TileB = std::conditional_t<kBNContiguous, SwizzledTile<kBlockK, kBlockN>,
                                 SwizzledTile<kBlockN, kBlockK>>;

// acc += A B over k_tiles slices of kBlockK. The A stages lie at smem_a, the B stages at
// smem_b; load_stage(stage, k_tile) issues the copies (cp.async, or plain stores) of slice
// k_tile into stage `stage`. acc holds this warp's 64x32 part of the 128x128 block tile.
template <typename T, bool kAKContiguous, bool kBNContiguous, typename LoadStage>
__device__ __forceinline__ void mainloop(float (&acc)[kMmaTilesM][kMmaTilesN][4],
                                         const T* smem_a, const T* smem_b, int k_tiles,
                                         LoadStage&& load_stage) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warp_m0 = (warp / kWarpsN) * kWarpTileM;
  const int warp_n0 = (warp % kWarpsN) * kWarpTileN;
  // ldmatrix.x4 loads four 8x8 matrices; lane l supplies row (l % 8) of matrix (l / 8).
  const int ld_row = lane % 8;
  const int ld_matrix = lane / 8;

  // Prologue: kStages - 1 tiles in flight. A commit per stage even when there is nothing
  // to load keeps the group count, and so the wait below, uniform.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (this thread's copies)
    __syncthreads();               // ... and everyone's; slot (kt - 1) is free again
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();

    const T* sa = smem_a + (kt % kStages) * TileA<kAKContiguous>::kElements;
    const T* sb = smem_b + (kt % kStages) * TileB<kBNContiguous>::kElements;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      uint32_t frag_a[kMmaTilesM][4];
      uint32_t frag_b[kMmaTilesN][2];
#pragma unroll
      for (int mi = 0; mi < kMmaTilesM; ++mi) {
        const int m_base = warp_m0 + mi * 16;
        if constexpr (kAKContiguous) {
          // Matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
          const int row = m_base + ld_row + (ld_matrix % 2) * 8;
          const int col = kk + (ld_matrix / 2) * 8;
          ldmatrix_x4(frag_a[mi], sa + TileA<kAKContiguous>::offset(row, col));
        } else {
          // Same four matrices read from the [k][m] tile and transposed by ldmatrix.
          const int row = kk + ld_row + (ld_matrix / 2) * 8;
          const int col = m_base + (ld_matrix % 2) * 8;
          ldmatrix_x4_trans(frag_a[mi], sa + TileA<kAKContiguous>::offset(row, col));
        }
      }
#pragma unroll
      for (int ni = 0; ni < kMmaTilesN; ni += 2) {
        const int n_base = warp_n0 + ni * 8;
        uint32_t regs[4];
        if constexpr (kBNContiguous) {
          // From the [k][n] tile, transposed: (k 0-7, n 0-7), (k 8-15, n 0-7),
          // (k 0-7, n 8-15), (k 8-15, n 8-15).
          const int row = kk + ld_row + (ld_matrix % 2) * 8;
          const int col = n_base + (ld_matrix / 2) * 8;
          ldmatrix_x4_trans(regs, sb + TileB<kBNContiguous>::offset(row, col));
        } else {
          // From the [n][k] tile the same four matrices need no transpose.
          const int row = n_base + ld_row + (ld_matrix / 2) * 8;
          const int col = kk + (ld_matrix % 2) * 8;
          ldmatrix_x4(regs, sb + TileB<kBNContiguous>::offset(row, col));
        }
        frag_b[ni][0] = regs[0];
        frag_b[ni][1] = regs[1];
        frag_b[ni + 1][0] = regs[2];
        frag_b[ni + 1][1] = regs[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMmaTilesM; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kMmaTilesN; ++ni) {
          mma_16816<T>(acc[mi][ni], frag_a[mi], frag_b[ni][0], frag_b[ni][1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits
}

// Writes the block tile at (block_m0, block_n0) through `out`: epilogue.cuh's
// EpilogueWriter, or a writer that places rows elsewhere (conv2d's dgrad phases).
template <typename Writer>
__device__ __forceinline__ void store_tile(const float (&acc)[kMmaTilesM][kMmaTilesN][4],
                                           const Writer& out, int64_t block_m0,
                                           int64_t block_n0) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warp_m0 = (warp / kWarpsN) * kWarpTileM;
  const int warp_n0 = (warp % kWarpsN) * kWarpTileN;
  // Accumulator element e of an m16n8 tile sits at row lane/4 (+8 for e >= 2),
  // column 2 * (lane % 4) + (e % 2).
#pragma unroll
  for (int mi = 0; mi < kMmaTilesM; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = out.place(block_m0 + warp_m0 + mi * 16 + lane / 4 + half * 8);
#pragma unroll
      for (int ni = 0; ni < kMmaTilesN; ++ni) {
        out.write(row, block_n0 + warp_n0 + ni * 8 + (lane % 4) * 2, acc[mi][ni][half * 2],
                  acc[mi][ni][half * 2 + 1]);
      }
    }
  }
}

}  // namespace matmul_sm80
}  // namespace tilesmith

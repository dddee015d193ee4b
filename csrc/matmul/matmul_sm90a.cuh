// Tensor-core matmul for Hopper (sm_90a) on wgmma: the MatmulParams and fused epilogue of
// matmul_sm80.cuh, with the warpgroup MMA that mma.sync cannot match on an H100 (mma.sync
// issues from each warp; wgmma reads both operands from shared memory at the rate the
// tensor cores run).
//
// A 128 x kBlockN output tile per block of two warpgroups (64 rows each), kBlockN = 256
// where n fills it, else 128; K advances 64 at a time through a cp.async pipeline into shared
// memory in the 128-byte swizzle that wgmma's descriptors read directly, four wgmma
// m64n{kBlockN}k16 a stage. Each operand is read in the layout it has in memory: a tile of
// a K-major operand (a row-major, or b stored as b^T) is rows of 64 K elements, a tile of an
// MN-major one (a stored as a^T, or b row-major) is blocks of 64 M or N elements by 64 K
// rows, and the wgmma transpose immediates tell the tensor cores which. So every transpose
// combination runs without a copy. The pipeline (one K step's wgmma in flight while the
// next step's copies are waited for and issued) is common/tiles_sm90a.cuh's
// run_wgmma_pipeline, the FP8 GEMM's too.
//
// Taken where cp.async can read both operands 16 bytes at a time (launch_matmul falls back to
// matmul_sm80.cuh otherwise). Not yet: TMA, warp specialization, a persistent schedule, and
// an epilogue staged through shared memory for wide stores.
#pragma once

#include "../common/tiles_sm80.cuh"
#include "../common/tiles_sm90a.cuh"
#include "../common/wgmma_sm90a.cuh"
#include "epilogue.cuh"
#include "launch.cuh"
#include "matmul.h"

namespace tilesmith {
namespace matmul_sm90a {

constexpr int kBlockM = 128;
constexpr int kBlockK = 64;  // 16-bit elements: one 128-byte swizzled row
constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kGroupM = 8;  // block rows that share B tiles in L2
constexpr int kTileBytesA = kBlockM * kBlockK * 2;  // 16 KiB

// Per tile width: as many stages as fit 227 KiB of shared memory with the 1024 bytes that
// align the start (the swizzle pattern is a function of the address bits 4-9). 128 wide:
// 5 stages of 32 KiB; 256 wide: 4 of 48 KiB.
template <int kBlockN>
struct Tiling {
  static_assert(kBlockN == 128 || kBlockN == 256, "tile widths: 128 and 256");
  static constexpr int kTileBytesB = kBlockN * kBlockK * 2;
  static constexpr int kStages = kBlockN == 128 ? 5 : 4;
  static constexpr int kSmemBytes = kStages * (kTileBytesA + kTileBytesB) + 1024;
};

inline int tile_width(const MatmulParams& p) { return p.n >= 256 ? 256 : 128; }

// Issues one K step's wgmma on the stage tiles at shared addresses a_tile (this
// warpgroup's 64 rows of a) and b_tile, and commits them as one group. kMnMajorA /
// kMnMajorB: the tiles' layouts (above). acc[4 j + 2 half + e] ends as row 16 warp + lane / 4
// + 8 half of the warpgroup's 64, column 8 j + 2 (lane % 4) + e (the m16n8 layout, kBlockN / 8
// times across).
template <typename T, int kBlockN, bool kMnMajorA, bool kMnMajorB>
__device__ __forceinline__ void issue_step(float (&acc)[kBlockN / 2], uint32_t a_tile,
                                           uint32_t b_tile) {
  // An MN-major tile's blocks of 64 columns lie kBlockK rows apart.
  constexpr uint32_t kMnBlockBytes = kBlockK * kSwizzleRowBytes;
  auto descriptor = [](uint32_t tile, int kk, bool mn_major) {
    // K-major: 16 elements of K are 32 bytes along the row; MN-major: 16 rows.
    return mn_major ? smem_descriptor_sw128(tile + kk * 16 * kSwizzleRowBytes, kMnBlockBytes)
                    : smem_descriptor_sw128(tile + kk * 32);
  };
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBlockK / 16; ++kk) {
    wgmma_m64nk16<kBlockN, T, kMnMajorA, kMnMajorB>(acc, descriptor(a_tile, kk, kMnMajorA),
                                                    descriptor(b_tile, kk, kMnMajorB), 1);
  }
  wgmma_commit();
}

// The offset of warpgroup `warpgroup`'s 64 rows in a stage's tile of a, in either layout:
// rows 64-127 of a K-major tile, the second 64-wide block of m of an M-major one.
__device__ __forceinline__ uint32_t warpgroup_rows_offset(int warpgroup) {
  return warpgroup * 64 * kSwizzleRowBytes;
}

// acc += A B over k_tiles slices of kBlockK (run_wgmma_pipeline): the A stages lie at
// smem_a, the B stages at smem_b, and load_stage(stage, k_tile) issues the cp.async copies
// of slice k_tile into stage `stage`.
template <typename T, int kBlockN, bool kMnMajorA, bool kMnMajorB, typename LoadStage>
__device__ __forceinline__ void mainloop(float (&acc)[kBlockN / 2], const uint8_t* smem_a,
                                         const uint8_t* smem_b, int k_tiles,
                                         LoadStage&& load_stage) {
  using Tiles = Tiling<kBlockN>;
  const uint32_t a_offset = warpgroup_rows_offset(threadIdx.x / 128);
  run_wgmma_pipeline<Tiles::kStages>(k_tiles, load_stage, [&](int stage, int) {
    issue_step<T, kBlockN, kMnMajorA, kMnMajorB>(
        acc, shared_address(smem_a + stage * kTileBytesA) + a_offset,
        shared_address(smem_b + stage * Tiles::kTileBytesB));
    wgmma_wait<1>();  // step kt - 1 retired; step kt runs on while the loop goes round
  });
  fence_registers(acc);  // read only after the pipeline's last wait
}

// Writes the block tile at (block_m0, block_n0) from the accumulators of warpgroup
// `warpgroup` (its 64 rows; by default the one of this thread) through `out`.
template <int kBlockN, typename Writer>
__device__ __forceinline__ void store_tile(const float (&acc)[kBlockN / 2], const Writer& out,
                                           int64_t block_m0, int64_t block_n0,
                                           int warpgroup = threadIdx.x / 128) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = out.place(block_m0 + warpgroup * 64 + warp * 16 + lane / 4 + half * 8);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      out.write(row, block_n0 + 8 * j + 2 * (lane % 4), acc[4 * j + 2 * half],
                acc[4 * j + 2 * half + 1]);
    }
  }
}

// kMnMajorA: a's unit stride runs along m (a stored as a^T), else along k.
// kMnMajorB: b's unit stride runs along n (row-major b), else along k (b stored as b^T).
// OutT: the output (and residual) type, T or float.
template <typename T, typename OutT, int kBlockN, bool kMnMajorA, bool kMnMajorB>
__global__ void __launch_bounds__(kThreads)
    matmul_kernel(const MatmulParams params, int64_t batch_offset) {
  using Tiles = Tiling<kBlockN>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_a = aligned_shared(shared_bytes);
  uint8_t* smem_b = smem_a + Tiles::kStages * kTileBytesA;

  const int64_t m = params.m, n = params.n, k = params.k;
  const int64_t z = batch_offset + blockIdx.y;
  const T* a = static_cast<const T*>(params.a) + z * params.a_batch_stride;
  const T* b = static_cast<const T*>(params.b) + z * params.b_batch_stride;
  int64_t block_m0, block_n0;
  grouped_block_tile<kBlockM, kBlockN, kGroupM>(m, n, blockIdx.x, block_m0, block_n0);

  auto load_stage = [&](int stage, int k_tile) {
    const int64_t k0 = static_cast<int64_t>(k_tile) * kBlockK;
    uint8_t* sa = smem_a + stage * kTileBytesA;
    uint8_t* sb = smem_b + stage * Tiles::kTileBytesB;
    if constexpr (kMnMajorA) {  // 64 K rows x two 64-wide blocks of m
      load_swizzled_tile<T, kThreads, kBlockK, kBlockM / 64>(sa, a, k0, k, block_m0, m,
                                                              params.a_col_stride);
    } else {  // 128 m rows x 64 K
      load_swizzled_tile<T, kThreads, kBlockM, 1>(sa, a, block_m0, m, k0, k,
                                                   params.a_row_stride);
    }
    if constexpr (kMnMajorB) {
      load_swizzled_tile<T, kThreads, kBlockK, kBlockN / 64>(sb, b, k0, k, block_n0, n,
                                                              params.b_row_stride);
    } else {
      load_swizzled_tile<T, kThreads, kBlockN, 1>(sb, b, block_n0, n, k0, k,
                                                   params.b_col_stride);
    }
  };

  float acc[kBlockN / 2] = {};
  mainloop<T, kBlockN, kMnMajorA, kMnMajorB>(acc, smem_a, smem_b,
                                             static_cast<int>((k + kBlockK - 1) / kBlockK),
                                             load_stage);
  store_tile<kBlockN>(acc, EpilogueWriter<T, OutT>(params, z), block_m0, block_n0);
}

// The operands' layouts: a is read M-major unless its k stride is 1; b N-major when its n
// stride is 1 (row-major b), else K-major.
inline bool mn_major_a(const MatmulParams& p) { return p.a_col_stride != 1; }
inline bool mn_major_b(const MatmulParams& p) { return p.b_col_stride == 1; }

// cp.async reads 16 bytes at a time: a unit stride where the layout reads along, the other
// stride and the batch stride multiples of 8 elements, a 16-byte aligned start.
inline bool loadable(const void* ptr, int64_t unit_stride, int64_t other_stride,
                     int64_t batch_stride) {
  return unit_stride == 1 && other_stride % 8 == 0 && batch_stride % 8 == 0 &&
         reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Whether these kernels take the call (else matmul_sm80.cuh's does).
inline bool takes(const MatmulParams& p) {
  const bool a_ok = mn_major_a(p)
      ? loadable(p.a, p.a_row_stride, p.a_col_stride, p.a_batch_stride)
      : loadable(p.a, p.a_col_stride, p.a_row_stride, p.a_batch_stride);
  const bool b_ok = mn_major_b(p)
      ? loadable(p.b, p.b_col_stride, p.b_row_stride, p.b_batch_stride)
      : loadable(p.b, p.b_row_stride, p.b_col_stride, p.b_batch_stride);
  return a_ok && b_ok;
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, typename OutT, int kBlockN, bool kMnMajorA, bool kMnMajorB>
cudaError_t launch(const MatmulParams& params, cudaStream_t stream) {
  const int64_t tiles = ((params.m + kBlockM - 1) / kBlockM) * ((params.n + kBlockN - 1) / kBlockN);
  return launch_over_batch(matmul_kernel<T, OutT, kBlockN, kMnMajorA, kMnMajorB>, params, tiles,
                           kThreads, Tiling<kBlockN>::kSmemBytes, stream);
}

template <typename T, typename OutT, int kBlockN>
cudaError_t launch_layout(const MatmulParams& p, cudaStream_t stream) {
  if (mn_major_a(p)) {
    return mn_major_b(p) ? launch<T, OutT, kBlockN, true, true>(p, stream)
                         : launch<T, OutT, kBlockN, true, false>(p, stream);
  }
  return mn_major_b(p) ? launch<T, OutT, kBlockN, false, true>(p, stream)
                       : launch<T, OutT, kBlockN, false, false>(p, stream);
}

// OutT: float where p.out_fp32, else T (one output type per .cu file).
template <typename T, typename OutT>
cudaError_t run(const MatmulParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.m == 0 || p.n == 0) return cudaSuccess;
  return tile_width(p) == 256 ? launch_layout<T, OutT, 256>(p, stream)
                              : launch_layout<T, OutT, 128>(p, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace matmul_sm90a
}  // namespace tilesmith

// Tensor-core matmul for sm_80 and newer: cp.async multi-stage pipeline into swizzled shared
// memory, ldmatrix into registers, mma.sync m16n8k16 with fp32 accumulators.
//
// Each operand is read in whichever of its two layouts it has in memory (the "contiguous
// dimension" is a template parameter): a transposed view costs nothing, the shared-memory
// tile keeps the global layout and ldmatrix's .trans form turns it around on the way into
// registers. Inputs whose layout cp.async cannot read 16 bytes at a time (a stride that is
// not a multiple of 8 elements, a misaligned pointer, no unit stride) take the same kernel
// with element-wise loads (kVectorLoads = false): slower, but any view is correct.
#pragma once

#include <type_traits>

#include "../common/mma_sm80.cuh"
#include "../common/tiles_sm80.cuh"
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

__device__ __forceinline__ float activate(float v, Activation activation) {
  switch (activation) {
    case Activation::kRelu:
      return fmaxf(v, 0.0f);
    case Activation::kGelu:
      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case Activation::kSilu:
      return v / (1.0f + expf(-v));
    default:
      return v;
  }
}

template <typename OutT>
__device__ __forceinline__ OutT to_out(float v) {
  if constexpr (std::is_same_v<OutT, float>) {
    return v;
  } else {
    return from_float<OutT>(v);
  }
}

template <typename OutT>
__device__ __forceinline__ float out_to_float(OutT v) {
  if constexpr (std::is_same_v<OutT, float>) {
    return v;
  } else {
    return to_float<OutT>(v);
  }
}

// Two neighbouring columns (col, col + 1) of one row: one 4- or 8-byte store when both are
// in range and aligned, else element by element.
template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* out, float v0, float v1, bool paired,
                                           bool has0, bool has1) {
  if (paired && has1) {
    OutT pair[2] = {to_out<OutT>(v0), to_out<OutT>(v1)};
    if constexpr (sizeof(OutT) == 4) {
      *reinterpret_cast<float2*>(out) = *reinterpret_cast<const float2*>(pair);
    } else {
      *reinterpret_cast<uint32_t*>(out) = *reinterpret_cast<const uint32_t*>(pair);
    }
    return;
  }
  if (has0) out[0] = to_out<OutT>(v0);
  if (has1) out[1] = to_out<OutT>(v1);
}

// kAKContiguous: a's unit stride runs along k (row-major a); otherwise along m.
// kBNContiguous: b's unit stride runs along n (row-major b); otherwise along k.
// OutT: the output (and residual) type, T or float.
template <typename T, typename OutT, bool kAKContiguous, bool kBNContiguous, bool kVectorLoads>
// No minimum-blocks hint: capped at 128 registers (two blocks per SM) ptxas spilled 8-28
// bytes in 8 of the 16 sm_80/sm_90 variants; uncapped they use 125-134 and none spills
// (most stay at 128, so two blocks per SM still fit).
// Whether a second resident block would pay for a smaller tile needs a GPU to decide.
__global__ void __launch_bounds__(kThreads)
    matmul_kernel(const MatmulParams params, int64_t batch_offset) {
  // Shared tiles per stage. A: [m][k] when k-contiguous, else [k][m]; B: [k][n] when
  // n-contiguous, else [n][k].
  using TileA = std::conditional_t<kAKContiguous, SwizzledTile<kBlockM, kBlockK>,
                                   SwizzledTile<kBlockK, kBlockM>>;
  using TileB = std::conditional_t<kBNContiguous, SwizzledTile<kBlockK, kBlockN>,
                                   SwizzledTile<kBlockN, kBlockK>>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_a = reinterpret_cast<T*>(shared_bytes);
  T* smem_b = smem_a + kStages * TileA::kElements;

  const int64_t m = params.m, n = params.n, k = params.k;
  const int64_t z = batch_offset + blockIdx.y;
  const T* a = static_cast<const T*>(params.a) + z * params.a_batch_stride;
  const T* b = static_cast<const T*>(params.b) + z * params.b_batch_stride;
  OutT* c = static_cast<OutT*>(params.c) + z * params.c_batch_stride;

  // Grouped ordering: consecutive blocks walk down kGroupM block rows before moving right,
  // so the B tiles they share are still in L2.
  const int tiles_m = static_cast<int>((m + kBlockM - 1) / kBlockM);
  const int tiles_n = static_cast<int>((n + kBlockN - 1) / kBlockN);
  const int blocks_per_group = kGroupM * tiles_n;
  const int group = blockIdx.x / blocks_per_group;
  const int first_tile_m = group * kGroupM;
  const int group_rows = min(tiles_m - first_tile_m, kGroupM);
  const int tile_m = first_tile_m + (blockIdx.x % blocks_per_group) % group_rows;
  const int tile_n = (blockIdx.x % blocks_per_group) / group_rows;
  const int64_t block_m0 = static_cast<int64_t>(tile_m) * kBlockM;
  const int64_t block_n0 = static_cast<int64_t>(tile_n) * kBlockN;

  auto load_stage = [&](int stage, int k_tile) {
    const int64_t k0 = static_cast<int64_t>(k_tile) * kBlockK;
    T* sa = smem_a + stage * TileA::kElements;
    T* sb = smem_b + stage * TileB::kElements;
    if constexpr (kAKContiguous) {
      load_tile<T, kBlockM, kBlockK, kThreads, kVectorLoads>(
          sa, a, block_m0, k0, m, k, params.a_row_stride, params.a_col_stride);
    } else {
      load_tile<T, kBlockK, kBlockM, kThreads, kVectorLoads>(
          sa, a, k0, block_m0, k, m, params.a_col_stride, params.a_row_stride);
    }
    if constexpr (kBNContiguous) {
      load_tile<T, kBlockK, kBlockN, kThreads, kVectorLoads>(
          sb, b, k0, block_n0, k, n, params.b_row_stride, params.b_col_stride);
    } else {
      load_tile<T, kBlockN, kBlockK, kThreads, kVectorLoads>(
          sb, b, block_n0, k0, n, k, params.b_col_stride, params.b_row_stride);
    }
  };

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warp_m0 = (warp / kWarpsN) * kWarpTileM;
  const int warp_n0 = (warp % kWarpsN) * kWarpTileN;
  // ldmatrix.x4 loads four 8x8 matrices; lane l supplies row (l % 8) of matrix (l / 8).
  const int ld_row = lane % 8;
  const int ld_matrix = lane / 8;

  float acc[kMmaTilesM][kMmaTilesN][4] = {};

  const int k_tiles = static_cast<int>((k + kBlockK - 1) / kBlockK);
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

    const T* sa = smem_a + (kt % kStages) * TileA::kElements;
    const T* sb = smem_b + (kt % kStages) * TileB::kElements;
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
          ldmatrix_x4(frag_a[mi], sa + TileA::offset(row, col));
        } else {
          // Same four matrices read from the [k][m] tile and transposed by ldmatrix.
          const int row = kk + ld_row + (ld_matrix / 2) * 8;
          const int col = m_base + (ld_matrix % 2) * 8;
          ldmatrix_x4_trans(frag_a[mi], sa + TileA::offset(row, col));
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
          ldmatrix_x4_trans(regs, sb + TileB::offset(row, col));
        } else {
          // From the [n][k] tile the same four matrices need no transpose.
          const int row = n_base + ld_row + (ld_matrix / 2) * 8;
          const int col = kk + (ld_matrix % 2) * 8;
          ldmatrix_x4(regs, sb + TileB::offset(row, col));
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

  // Epilogue. Accumulator element e of an m16n8 tile sits at row lane/4 (+8 for e >= 2),
  // column 2 * (lane % 4) + (e % 2). Pairs go out as one store when the row strides keep
  // them aligned. The epilogue's branches are uniform across the block.
  const bool paired_stores = (params.c_row_stride % 2) == 0;
  const bool paired_pre = (params.pre_row_stride % 2) == 0;
  const OutT* residual = params.residual == nullptr ? nullptr
      : static_cast<const OutT*>(params.residual) + z * params.residual_batch_stride;
  T* pre = params.pre == nullptr ? nullptr
      : static_cast<T*>(params.pre) + z * params.pre_batch_stride;
#pragma unroll
  for (int mi = 0; mi < kMmaTilesM; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kMmaTilesN; ++ni) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = block_m0 + warp_m0 + mi * 16 + lane / 4 + half * 8;
        const int64_t col = block_n0 + warp_n0 + ni * 8 + (lane % 4) * 2;
        if (row >= m) continue;
        const bool has0 = col < n, has1 = col + 1 < n;
        float v[2] = {acc[mi][ni][half * 2] * params.alpha,
                      acc[mi][ni][half * 2 + 1] * params.alpha};
        if (params.bias != nullptr) {
          if (has0) v[0] += params.bias[col];
          if (has1) v[1] += params.bias[col + 1];
        }
        if (pre != nullptr) {
          store_pair<T>(pre + row * params.pre_row_stride + col, v[0], v[1], paired_pre, has0,
                        has1);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) v[e] = activate(v[e], params.activation);
        if (residual != nullptr) {
          const OutT* r = residual + row * params.residual_row_stride + col;
          if (has0) v[0] += out_to_float<OutT>(r[0]);
          if (has1) v[1] += out_to_float<OutT>(r[1]);
        }
        store_pair<OutT>(c + row * params.c_row_stride + col, v[0], v[1], paired_stores, has0,
                         has1);
      }
    }
  }
}

template <typename T>
constexpr int smem_bytes() {
  return kStages * (kBlockM + kBlockN) * kBlockK * static_cast<int>(sizeof(T));
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, bool kAKContiguous, bool kBNContiguous, bool kVectorLoads>
cudaError_t launch(const MatmulParams& params, cudaStream_t stream) {
  constexpr int kSmemBytes = smem_bytes<T>();
  auto kernel = params.out_fp32
      ? matmul_kernel<T, float, kAKContiguous, kBNContiguous, kVectorLoads>
      : matmul_kernel<T, T, kAKContiguous, kBNContiguous, kVectorLoads>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in; cheap, so done per launch
  // rather than guarded by a static that would be per-process, not per-device.
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = ((params.m + kBlockM - 1) / kBlockM) * ((params.n + kBlockN - 1) / kBlockN);
  // grid.y is capped at 65535: larger batches go in several launches.
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t z0 = 0; z0 < params.batch; z0 += kMaxGridY) {
    const int64_t batches = params.batch - z0 < kMaxGridY ? params.batch - z0 : kMaxGridY;
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(batches));
    kernel<<<grid, kThreads, kSmemBytes, stream>>>(params, z0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// 16-byte cp.async needs a unit stride in the loaded dimension, 16-byte aligned rows and
// 16-byte aligned batch slices.
inline bool vector_loadable(const void* ptr, int64_t unit_stride, int64_t row_stride,
                            int64_t batch_stride) {
  return unit_stride == 1 && row_stride % 8 == 0 && batch_stride % 8 == 0 &&
         reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

template <typename T>
cudaError_t run(const MatmulParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.m == 0 || p.n == 0) return cudaSuccess;
  const int64_t max_tiles = 0x7fffffff;
  if (((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN) > max_tiles) {
    return cudaErrorInvalidConfiguration;
  }
  // a is read along k when its k stride is 1 (or neither stride is 1 and k's is smaller).
  const bool a_k_contiguous =
      p.a_col_stride == 1 || (p.a_row_stride != 1 && p.a_col_stride <= p.a_row_stride);
  const bool b_n_contiguous =
      p.b_col_stride == 1 || (p.b_row_stride != 1 && p.b_col_stride <= p.b_row_stride);
  const bool vector_a =
      a_k_contiguous ? vector_loadable(p.a, p.a_col_stride, p.a_row_stride, p.a_batch_stride)
                     : vector_loadable(p.a, p.a_row_stride, p.a_col_stride, p.a_batch_stride);
  const bool vector_b =
      b_n_contiguous ? vector_loadable(p.b, p.b_col_stride, p.b_row_stride, p.b_batch_stride)
                     : vector_loadable(p.b, p.b_row_stride, p.b_col_stride, p.b_batch_stride);
  const bool vector_loads = vector_a && vector_b;

  if (a_k_contiguous) {
    if (b_n_contiguous) {
      return vector_loads ? launch<T, true, true, true>(p, stream)
                          : launch<T, true, true, false>(p, stream);
    }
    return vector_loads ? launch<T, true, false, true>(p, stream)
                        : launch<T, true, false, false>(p, stream);
  }
  if (b_n_contiguous) {
    return vector_loads ? launch<T, false, true, true>(p, stream)
                        : launch<T, false, true, false>(p, stream);
  }
  return vector_loads ? launch<T, false, false, true>(p, stream)
                      : launch<T, false, false, false>(p, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace matmul_sm80
}  // namespace tilesmith

// Tensor-core matmul for sm_80 and newer, on the main loop and epilogue of
// mainloop_sm80.cuh: this file adds the strided operand loads, the grouped block order and
// the launch.
//
// Each operand is read in whichever of its two layouts it has in memory: a transposed view
// costs nothing. Inputs whose layout cp.async cannot read 16 bytes at a time (a stride that is
// not a multiple of 8 elements, a misaligned pointer, no unit stride) take the same kernel
// with element-wise loads (kVectorLoads = false): slower, but any view is correct.
#pragma once

#include "launch.cuh"
#include "mainloop_sm80.cuh"

namespace tilesmith {
namespace matmul_sm80 {

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
  using TileA = matmul_sm80::TileA<kAKContiguous>;
  using TileB = matmul_sm80::TileB<kBNContiguous>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_a = reinterpret_cast<T*>(shared_bytes);
  T* smem_b = smem_a + kStages * TileA::kElements;

  const int64_t m = params.m, n = params.n, k = params.k;
  const int64_t z = batch_offset + blockIdx.y;
  const T* a = static_cast<const T*>(params.a) + z * params.a_batch_stride;
  const T* b = static_cast<const T*>(params.b) + z * params.b_batch_stride;
  int64_t block_m0, block_n0;
  grouped_block_tile(m, n, blockIdx.x, block_m0, block_n0);

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

  float acc[kMmaTilesM][kMmaTilesN][4] = {};
  mainloop<T, kAKContiguous, kBNContiguous>(acc, smem_a, smem_b,
                                            static_cast<int>((k + kBlockK - 1) / kBlockK),
                                            load_stage);
  store_tile(acc, EpilogueWriter<T, OutT>(params, z), block_m0, block_n0);
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, bool kAKContiguous, bool kBNContiguous, bool kVectorLoads>
cudaError_t launch(const MatmulParams& params, cudaStream_t stream) {
  constexpr int kSmemBytes = smem_bytes<T>();
  auto kernel = params.out_fp32
      ? matmul_kernel<T, float, kAKContiguous, kBNContiguous, kVectorLoads>
      : matmul_kernel<T, T, kAKContiguous, kBNContiguous, kVectorLoads>;
  const int64_t tiles = ((params.m + kBlockM - 1) / kBlockM) * ((params.n + kBlockN - 1) / kBlockN);
  return launch_over_batch(kernel, params, tiles, kThreads, kSmemBytes, stream);
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

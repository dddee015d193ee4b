// conv2d forward for Hopper (sm_90a) as an implicit GEMM on the wgmma main loop of
// csrc/matmul/matmul_sm90a.cuh: out[NPQ x K] = gather(x)[NPQ x RSC] . weight^T, one GEMM per
// group (grid y), the fused epilogue of matmul/epilogue.cuh. Both operands are K-major
// (channels contiguous): the gathered pixels x channels tile (conv2d/forward.cuh, the same
// gather as the sm_80 forward) and the filters x channels slice of the weight at the tap.
// Tiles 128 x 128 or 128 x 256 (filters per group >= 256), as the matmul picks them.
#pragma once

#include "../matmul/matmul_sm90a.cuh"
#include "conv2d.h"
#include "forward.cuh"

namespace tilesmith {
namespace conv2d_sm90a {

using namespace matmul_sm90a;

template <typename T, int kBlockN>
__global__ void __launch_bounds__(kThreads)
    conv2d_fwd_kernel(const ConvParams cp, const MatmulParams out) {
  using Tiles = Tiling<kBlockN>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_a = aligned_shared(shared_bytes);
  uint8_t* smem_b = smem_a + Tiles::kStages * kTileBytesA;
  const int64_t group = blockIdx.y, channels = cp.channels;
  const int taps = static_cast<int>(cp.kernel_h * cp.kernel_w);
  const T* weight = static_cast<const T*>(cp.weight) + group * cp.filters * taps * channels;

  int64_t block_m0, block_n0;
  grouped_block_tile<kBlockM, kBlockN, kGroupM>(out.m, out.n, blockIdx.x, block_m0, block_n0);
  const ForwardGather<T, kThreads, kBlockM> gather(cp, group, out.m, block_m0);

  const int channel_blocks = static_cast<int>((channels + kBlockK - 1) / kBlockK);
  auto load_stage = [&](int stage, int k_tile) {
    const int tap = k_tile / channel_blocks;
    const int64_t c0 = static_cast<int64_t>(k_tile % channel_blocks) * kBlockK;
    gather.load(reinterpret_cast<T*>(smem_a + stage * kTileBytesA), tap, c0);
    // weight[k][r][s][c]: at tap (r, s) a filters x channels matrix with row stride R*S*C.
    load_swizzled_tile<T, kThreads, kBlockN, 1>(smem_b + stage * Tiles::kTileBytesB,
                                                 weight + tap * channels, block_n0, cp.filters,
                                                 c0, channels, taps * channels);
  };

  float acc[kBlockN / 2] = {};
  mainloop<T, kBlockN, false, false>(acc, smem_a, smem_b, taps * channel_blocks, load_stage);
  store_tile<kBlockN>(acc, EpilogueWriter<T, T>(group_output<T>(out, group, cp.filters), 0),
                      block_m0, block_n0);
}

// The tile width of a call: 256 where a group's filters fill it.
inline int tile_width(const MatmulParams& out) { return out.n >= 256 ? 256 : 128; }

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, int kBlockN>
cudaError_t launch(const ConvParams& cp, const MatmulParams& out, cudaStream_t stream) {
  constexpr int kSmemBytes = Tiling<kBlockN>::kSmemBytes;
  auto kernel = conv2d_fwd_kernel<T, kBlockN>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = ((out.m + kBlockM - 1) / kBlockM) * ((out.n + kBlockN - 1) / kBlockN);
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(cp.groups));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(cp, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_fwd(const ConvParams& cp, const MatmulParams& out, cudaStream_t stream) {
  if (out.m == 0 || out.n == 0) return cudaSuccess;
  return tile_width(out) == 256 ? launch<T, 256>(cp, out, stream)
                                : launch<T, 128>(cp, out, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace conv2d_sm90a
}  // namespace tilesmith

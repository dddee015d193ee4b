// conv2d forward, dgrad and wgrad for sm_80 and newer as implicit GEMMs on the matmul
// kernel's main loop (csrc/matmul/mainloop_sm80.cuh): the same 128x128x64 tiles, cp.async
// pipeline, ldmatrix/mma.sync and fused epilogue. What differs is how a stage is filled:
// the gathered operand's rows are pixels, and a K slice is 64 channels at one filter tap
// (r, s), so every 16-byte chunk is 8 consecutive channels of one pixel (channels-last, C and
// K multiples of 8). Padding, image borders and (dgrad) the taps a stride skips are chunks
// cp.async zero-fills; no im2col buffer exists. Each thread works out the pixel of the rows
// it copies once per block (forward, dgrad) or once per K slice (wgrad, whose rows are the
// reduction) and steps through the taps from there.
#pragma once

#include "../matmul/mainloop_sm80.cuh"
#include "conv2d.h"
#include "gather.cuh"

namespace tilesmith {
namespace conv2d_sm80 {

using namespace matmul_sm80;
static_assert(smem_bytes<__half>() == kSm80ConvSmemBytes, "conv2d.h's figure is the tiles'");

// Rows of a [rows][64] tile one thread copies, kRowsPerPass apart, and its chunk column.
template <int kCols>
struct GatherLayout {
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  __device__ __forceinline__ static int row() { return threadIdx.x / kChunksPerRow; }
  __device__ __forceinline__ static int col() { return (threadIdx.x % kChunksPerRow) * 8; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    conv2d_fwd_kernel(const ConvParams cp, const MatmulParams out) {
  using TileA = matmul_sm80::TileA<true>;    // [output pixel][channel]
  using TileB = matmul_sm80::TileB<false>;   // [filter][channel]
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_a = reinterpret_cast<T*>(shared_bytes);
  T* smem_b = smem_a + kStages * TileA::kElements;
  const int64_t group = blockIdx.y, channels = cp.channels;
  const int taps = static_cast<int>(cp.kernel_h * cp.kernel_w);
  const T* weight = static_cast<const T*>(cp.weight) + group * cp.filters * taps * channels;

  int64_t block_m0, block_n0;
  grouped_block_tile(out.m, out.n, blockIdx.x, block_m0, block_n0);
  const ForwardGather<T, kThreads, kBlockM> gather(cp, group, out.m, block_m0);

  const int channel_blocks = static_cast<int>((channels + kBlockK - 1) / kBlockK);
  const int k_tiles = taps * channel_blocks;
  auto load_stage = [&](int stage, int k_tile) {
    const int tap = k_tile / channel_blocks;
    const int64_t c0 = static_cast<int64_t>(k_tile % channel_blocks) * kBlockK;
    gather.load(smem_a + stage * TileA::kElements, tap, c0);
    // weight[k][r][s][c]: at tap (r, s) a filters x channels matrix with row stride R*S*C.
    load_tile<T, kBlockN, kBlockK, kThreads, true>(
        smem_b + stage * TileB::kElements, weight + tap * channels, block_n0, c0, cp.filters,
        channels, taps * channels, 1);
  };

  float acc[kMmaTilesM][kMmaTilesN][4] = {};
  mainloop<T, true, false>(acc, smem_a, smem_b, k_tiles, load_stage);
  store_tile(acc, EpilogueWriter<T, T>(group_output<T>(out, group, cp.filters), 0), block_m0,
             block_n0);
}

// Block (tile, group, phase): one phase's (DgradPhase) input pixels x channels of dx, over
// the taps that reach them. Blocks past the phase's tiles (the grid fits the largest) exit.
template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    conv2d_dgrad_kernel(const ConvParams cp, const MatmulParams out) {
  using TileA = matmul_sm80::TileA<true>;   // [input pixel][filter]
  using TileB = matmul_sm80::TileB<true>;   // [filter][channel]
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_a = reinterpret_cast<T*>(shared_bytes);
  T* smem_b = smem_a + kStages * TileA::kElements;
  const int64_t group = blockIdx.y, filters = cp.filters;
  const int taps = static_cast<int>(cp.kernel_h * cp.kernel_w);
  const T* weight = static_cast<const T*>(cp.weight) + group * filters * taps * cp.channels;
  const DgradPhase phase(cp, blockIdx.z);
  if (blockIdx.x >= tile_count<kBlockM, kBlockN>(phase.pixels, out.n)) return;

  int64_t block_m0, block_n0;
  grouped_block_tile(phase.pixels, out.n, blockIdx.x, block_m0, block_n0);
  const DgradGather<T, kThreads, kBlockM> gather(cp, phase, group, block_m0);

  const int filter_blocks = static_cast<int>((filters + kBlockK - 1) / kBlockK);
  auto load_stage = [&](int stage, int k_tile) {
    const int tap = phase.tap(k_tile / filter_blocks);
    const int64_t k0 = static_cast<int64_t>(k_tile % filter_blocks) * kBlockK;
    gather.load(smem_a + stage * TileA::kElements, tap, k0);
    // weight[k][r][s][c] at tap (r, s): a filters x channels matrix, channels contiguous.
    load_tile<T, kBlockK, kBlockN, kThreads, true>(
        smem_b + stage * TileB::kElements, weight + tap * cp.channels, k0, block_n0, filters,
        cp.channels, taps * cp.channels, 1);
  };

  float acc[kMmaTilesM][kMmaTilesN][4] = {};
  mainloop<T, true, true>(acc, smem_a, smem_b, phase.tap_count() * filter_blocks, load_stage);
  const MatmulParams dx = group_output<T>(out, group, cp.channels);
  const EpilogueWriter<T, T> by_pixel(dx, 0);
  store_tile(acc, PhaseWriter<EpilogueWriter<T, T>>{by_pixel, phase}, block_m0, block_n0);
}

// Block (tile, group * taps + tap, split): filters x channels of one group's weight gradient
// at one tap, summed over one split of the output pixels, written to partial[split] in fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    conv2d_wgrad_kernel(const ConvParams cp, const MatmulParams out) {
  using TileA = matmul_sm80::TileA<false>;  // [output pixel][filter]
  using TileB = matmul_sm80::TileB<true>;   // [output pixel][channel]
  using Gather = GatherLayout<kBlockN>;
  constexpr int kPasses = kBlockK / Gather::kRowsPerPass;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_a = reinterpret_cast<T*>(shared_bytes);
  T* smem_b = smem_a + kStages * TileA::kElements;
  const WgradBlock block(cp);
  const int64_t channels = cp.channels;
  const int64_t x_pixel_stride = channels * cp.groups;
  const int64_t grad_pixel_stride = cp.filters * cp.groups;
  const T* x = static_cast<const T*>(cp.x) + block.group * channels;
  const T* grad_out = static_cast<const T*>(cp.grad_out) + block.group * cp.filters;

  int64_t block_m0, block_n0;
  grouped_block_tile(out.m, out.n, blockIdx.x, block_m0, block_n0);

  const int row = Gather::row(), col = Gather::col();
  const bool col_ok = block_n0 + col < channels;
  auto load_stage = [&](int stage, int k_tile) {
    const int64_t pixel0 = block.begin + static_cast<int64_t>(k_tile) * kBlockK;
    // grad_out as a pixels x filters matrix; rows past this split's end read as zeros.
    load_tile<T, kBlockK, kBlockM, kThreads, true>(smem_a + stage * TileA::kElements, grad_out,
                                                   pixel0, block_m0, block.end, cp.filters,
                                                   grad_pixel_stride, 1);
    T* dst = smem_b + stage * TileB::kElements + TileB::offset(row, col);
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int64_t pixel = pixel0 + row + i * Gather::kRowsPerPass;
      const int64_t input = block.input_pixel(pixel);
      const bool ok = col_ok && input >= 0;
      const T* src = x + input * x_pixel_stride + block_n0 + col;
      cp_async_16(dst + i * Gather::kRowsPerPass * kBlockN, ok ? src : x, ok ? 16 : 0);
    }
  };

  float acc[kMmaTilesM][kMmaTilesN][4] = {};
  mainloop<T, false, true>(acc, smem_a, smem_b, block.k_tiles<kBlockK>(), load_stage);
  store_tile(acc, EpilogueWriter<T, float>(block.output(out), blockIdx.z), block_m0, block_n0);
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernels itself
template <typename Kernel>
cudaError_t launch(Kernel kernel, ConvPass pass, const ConvParams& cp, const MatmulParams& out,
                   int splits, int smem, cudaStream_t stream) {
  if (out.m == 0 || out.n == 0) return cudaSuccess;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid = conv_grid<kBlockM, kBlockN>(pass, cp, out, splits);
  kernel<<<grid, kThreads, smem, stream>>>(cp, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_fwd(const ConvParams& cp, const MatmulParams& out, cudaStream_t stream) {
  return launch(conv2d_fwd_kernel<T>, kForward, cp, out, 1, smem_bytes<T>(), stream);
}

template <typename T>
cudaError_t run_dgrad(const ConvParams& cp, const MatmulParams& out, cudaStream_t stream) {
  return launch(conv2d_dgrad_kernel<T>, kDgrad, cp, out, 1, smem_bytes<T>(), stream);
}

template <typename T>
cudaError_t run_wgrad(const ConvParams& cp, const MatmulParams& out, int splits,
                      cudaStream_t stream) {
  return launch(conv2d_wgrad_kernel<T>, kWgrad, cp, out, splits, smem_bytes<T>(), stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace conv2d_sm80
}  // namespace tilesmith

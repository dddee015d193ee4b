// conv2d forward, dgrad and wgrad for Hopper (sm_90a) as implicit GEMMs on the wgmma main
// loop of csrc/matmul/matmul_sm90a.cuh, one GEMM per group, with C and K the group's channel
// and filter counts (conv2d.h):
//   forward  out[NPQ x K] = gather(x)[NPQ x RSC] . weight^T: both operands K-major
//            (channels contiguous): ForwardGather's pixels x channels tile, and the
//            filters x channels slice of the weight at the tap. The fused epilogue of
//            matmul/epilogue.cuh.
//   dgrad    dx[NHW x C] = gather(grad_out)[NHW x RSK] . weight[RSK x C], one GEMM per
//            phase of the stride (DgradPhase): DgradGather's pixels x filters tile
//            (K-major), and the weight at the tap as filters x channels, channels
//            contiguous: N-major.
//   wgrad    partial[split][K x RSC] = grad_out^T[K x NPQ] . gather(x)[NPQ x RSC], fp32: the
//            reduction runs over output pixels, so both operands are MN-major: grad_out's
//            pixel rows of filters, and the input pixels each output pixel reads at the
//            tap, rows of channels.
// The gathers are gather.cuh's, shared with the sm_80 kernels (conv2d_sm80.cuh), whose
// grids, splits and outputs these kernels keep. Tiles 128 x 128, or 128 x 256 where the
// GEMM's n (filters for the forward, channels for dgrad and wgrad) fills them.
#pragma once

#include "../matmul/matmul_sm90a.cuh"
#include "conv2d.h"
#include "gather.cuh"

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

// Block (tile, group, phase): one phase's (DgradPhase) input pixels x channels of dx, over
// the taps that reach them. Blocks past the phase's tiles (the grid fits the largest) exit.
template <typename T, int kBlockN>
__global__ void __launch_bounds__(kThreads)
    conv2d_dgrad_kernel(const ConvParams cp, const MatmulParams out) {
  using Tiles = Tiling<kBlockN>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_a = aligned_shared(shared_bytes);
  uint8_t* smem_b = smem_a + Tiles::kStages * kTileBytesA;
  const int64_t group = blockIdx.y, filters = cp.filters, channels = cp.channels;
  const int taps = static_cast<int>(cp.kernel_h * cp.kernel_w);
  const T* weight = static_cast<const T*>(cp.weight) + group * filters * taps * channels;
  const DgradPhase phase(cp, blockIdx.z);
  if (blockIdx.x >= tile_count<kBlockM, kBlockN>(phase.pixels, out.n)) return;

  int64_t block_m0, block_n0;
  grouped_block_tile<kBlockM, kBlockN, kGroupM>(phase.pixels, out.n, blockIdx.x, block_m0,
                                                block_n0);
  const DgradGather<T, kThreads, kBlockM> gather(cp, phase, group, block_m0);

  const int filter_blocks = static_cast<int>((filters + kBlockK - 1) / kBlockK);
  auto load_stage = [&](int stage, int k_tile) {
    const int tap = phase.tap(k_tile / filter_blocks);
    const int64_t k0 = static_cast<int64_t>(k_tile % filter_blocks) * kBlockK;
    gather.load(reinterpret_cast<T*>(smem_a + stage * kTileBytesA), tap, k0);
    // weight[k][r][s][c] at tap (r, s): 64 filter rows x kBlockN / 64 blocks of 64 channels.
    load_swizzled_tile<T, kThreads, kBlockK, kBlockN / 64>(smem_b + stage * Tiles::kTileBytesB,
                                                            weight + tap * channels, k0, filters,
                                                            block_n0, channels, taps * channels);
  };

  float acc[kBlockN / 2] = {};
  mainloop<T, kBlockN, false, true>(acc, smem_a, smem_b, phase.tap_count() * filter_blocks,
                                    load_stage);
  const MatmulParams dx = group_output<T>(out, group, channels);
  const EpilogueWriter<T, T> by_pixel(dx, 0);
  store_tile<kBlockN>(acc, PhaseWriter<EpilogueWriter<T, T>>{by_pixel, phase}, block_m0,
                      block_n0);
}

// Block (tile, group * taps + tap, split): filters x channels of one group's weight gradient
// at one tap, summed over one split of the output pixels, written to partial[split] in fp32.
template <typename T, int kBlockN>
__global__ void __launch_bounds__(kThreads)
    conv2d_wgrad_kernel(const ConvParams cp, const MatmulParams out) {
  using Tiles = Tiling<kBlockN>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_a = aligned_shared(shared_bytes);
  uint8_t* smem_b = smem_a + Tiles::kStages * kTileBytesA;
  const WgradBlock block(cp);
  const int64_t channels = cp.channels;
  const int64_t x_pixel_stride = channels * cp.groups;
  const T* x = static_cast<const T*>(cp.x) + block.group * channels;
  const T* grad_out = static_cast<const T*>(cp.grad_out) + block.group * cp.filters;

  int64_t block_m0, block_n0;
  grouped_block_tile<kBlockM, kBlockN, kGroupM>(out.m, out.n, blockIdx.x, block_m0, block_n0);

  // This thread's 16-byte piece of the B rows (8 channels) and the rows it copies.
  constexpr int kPiecesPerRow = kBlockN / 8;
  constexpr int kRowsPerPass = kThreads / kPiecesPerRow;
  const int piece = threadIdx.x % kPiecesPerRow, first_row = threadIdx.x / kPiecesPerRow;
  const bool col_ok = block_n0 + piece * 8 < channels;
  const T* x_cols = x + block_n0 + piece * 8;
  const int column_block_bytes = (piece / 8) * kBlockK * kSwizzleRowBytes;  // its 64 channels

  auto load_stage = [&](int stage, int k_tile) {
    const int64_t pixel0 = block.begin + static_cast<int64_t>(k_tile) * kBlockK;
    // A = grad_out^T: 64 pixel rows x two 64-wide blocks of filters; rows past this split's
    // end read as zeros.
    load_swizzled_tile<T, kThreads, kBlockK, kBlockM / 64>(smem_a + stage * kTileBytesA,
                                                            grad_out, pixel0, block.end, block_m0,
                                                            cp.filters, cp.filters * cp.groups);
    // B: 64 pixel rows x kBlockN / 64 blocks of 64 channels of the input each reads.
    uint8_t* tile = smem_b + stage * Tiles::kTileBytesB + column_block_bytes;
#pragma unroll
    for (int pass = 0; pass < kBlockK / kRowsPerPass; ++pass) {
      const int row = first_row + pass * kRowsPerPass;
      const int64_t pixel = pixel0 + row;
      const int64_t input = block.input_pixel(pixel);
      const bool ok = col_ok && input >= 0;
      cp_async_16(tile + swizzled_offset(row, (piece % 8) * 16),
                  ok ? x_cols + input * x_pixel_stride : x, ok ? 16 : 0);
    }
  };

  float acc[kBlockN / 2] = {};
  mainloop<T, kBlockN, true, true>(acc, smem_a, smem_b, block.k_tiles<kBlockK>(), load_stage);
  store_tile<kBlockN>(acc, EpilogueWriter<T, float>(block.output(out), blockIdx.z), block_m0,
                      block_n0);
}

// The tile width of a call: 256 where the GEMM's n (a group's filters or channels) fills it.
inline int tile_width(const MatmulParams& out) { return out.n >= 256 ? 256 : 128; }

template <ConvPass kPass, typename T, int kBlockN>
constexpr auto kernel_of() {
  if constexpr (kPass == kForward) return conv2d_fwd_kernel<T, kBlockN>;
  else if constexpr (kPass == kDgrad) return conv2d_dgrad_kernel<T, kBlockN>;
  else return conv2d_wgrad_kernel<T, kBlockN>;
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernels itself
template <ConvPass kPass, typename T, int kBlockN>
cudaError_t launch(const ConvParams& cp, const MatmulParams& out, int splits,
                   cudaStream_t stream) {
  constexpr int kSmemBytes = Tiling<kBlockN>::kSmemBytes;
  constexpr auto kernel = kernel_of<kPass, T, kBlockN>();
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  if (tile_count<kBlockM, kBlockN>(out.m, out.n) > 0x7fffffff) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid = conv_grid<kBlockM, kBlockN>(kPass, cp, out, splits);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(cp, out);
  return cudaGetLastError();
}

// Pass kPass of the call (splits: wgrad's split count; the others take 1).
template <ConvPass kPass, typename T>
cudaError_t run(const ConvParams& cp, const MatmulParams& out, int splits, cudaStream_t stream) {
  if (out.m == 0 || out.n == 0) return cudaSuccess;
  return tile_width(out) == 256 ? launch<kPass, T, 256>(cp, out, splits, stream)
                                : launch<kPass, T, 128>(cp, out, splits, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace conv2d_sm90a
}  // namespace tilesmith

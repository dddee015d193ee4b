// The plain interface between conv2d_api.cpp (which sees ATen) and the kernel files. All
// activations are channels-last and contiguous: x (N, H, W, C), grad_out (N, P, Q, K); the
// weight is (K, R, S, C). Where each pass writes, and its epilogue, is a MatmulParams.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../matmul/matmul.h"

namespace tilesmith {

struct ConvParams {
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* grad_out = nullptr;
  int64_t batch, height, width;           // x: N, H, W (and groups * channels)
  int64_t channels, filters;              // per group: C / groups, K / groups
  int64_t groups = 1;
  int64_t kernel_h, kernel_w;             // weight: (K, R, S, C / groups)
  int64_t out_h, out_w;                   // P, Q
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t split_pixels = 0;               // wgrad: output pixels per split of the reduction
};

// wgrad's split of the N*P*Q reduction into `splits` launches of `blocks` blocks each, where
// `slots` blocks run at a time (SMs x blocks per SM) and no split may have fewer than
// `min_pixels` pixels. Picks the count that minimises the time per pixel, waves / splits
// with waves = ceil(blocks * splits / slots) (a last wave that is mostly empty costs a whole
// one), among counts that launch at most four full waves (each split adds an fp32 partial
// of the weight gradient to write and sum); ties go to fewer splits.
inline int64_t wgrad_splits(int64_t pixels, int64_t blocks, int64_t slots, int64_t min_pixels) {
  const int64_t most_by_work = pixels / min_pixels;
  const int64_t most_by_waves = (4 * slots + blocks - 1) / blocks;
  int64_t most = most_by_work < most_by_waves ? most_by_work : most_by_waves;
  most = most < 65535 ? most : 65535;  // grid z
  int64_t best = 1, best_waves = (blocks + slots - 1) / slots;
  for (int64_t splits = 2; splits <= most; ++splits) {
    const int64_t waves = (blocks * splits + slots - 1) / slots;
    if (waves * best < best_waves * splits) {  // waves / splits < best_waves / best
      best = splits;
      best_waves = waves;
    }
  }
  return best;
}

// The sm_80 kernels' shared memory per block (three stages of a 128 x 64 and a 64 x 128
// 16-bit tile): two blocks share an H100 SM, one fits an A100's.
constexpr int kSm80ConvSmemBytes = 96 * 1024;

// The three passes, numbered as the launchers and the emulator take them.
enum ConvPass { kForward = 0, kDgrad = 1, kWgrad = 2 };

// dgrad with a stride runs as one GEMM per phase of the input pixels (DgradPhase in
// gather.cuh): stride_h * stride_w of them (grid z), the largest with this many rows.
inline int64_t dgrad_phases(const ConvParams& cp) {
  return static_cast<int64_t>(cp.stride_h) * cp.stride_w;
}
inline int64_t dgrad_rows_per_phase(const ConvParams& cp) {
  return cp.batch * ((cp.height + cp.stride_h - 1) / cp.stride_h) *
         ((cp.width + cp.stride_w - 1) / cp.stride_w);
}

// Each pass is an implicit GEMM on the matmul kernel's main loop (fp32 accumulation), one
// per group (grid y), with C and K the group's channel and filter counts:
//   forward  out[NPQ x K]      = gather(x)[NPQ x RSC] . weight^T, fused epilogue from `out`;
//   dgrad    dx[NHW x C]       = gather(grad_out)[NHW x RSK] . weight[RSK x C], per phase
//            (grid z) over its pixels and the taps that reach them;
//   wgrad    partial[split][K x RSC] (fp32) = grad_out^T[K x NPQ] . gather(x)[NPQ x RSC].
// `out` describes group 0's columns (its row stride is the whole width); the kernels offset
// the pointers to their group. C and K per group must be multiples of 8 (16-byte rows).
cudaError_t run_conv2d_fwd_sm80_bf16(const ConvParams& conv, const MatmulParams& out,
                                     cudaStream_t stream);
cudaError_t run_conv2d_fwd_sm80_fp16(const ConvParams& conv, const MatmulParams& out,
                                     cudaStream_t stream);
cudaError_t run_conv2d_dgrad_sm80_bf16(const ConvParams& conv, const MatmulParams& out,
                                       cudaStream_t stream);
cudaError_t run_conv2d_dgrad_sm80_fp16(const ConvParams& conv, const MatmulParams& out,
                                       cudaStream_t stream);
cudaError_t run_conv2d_wgrad_sm80_bf16(const ConvParams& conv, const MatmulParams& out,
                                       int splits, cudaStream_t stream);
cudaError_t run_conv2d_wgrad_sm80_fp16(const ConvParams& conv, const MatmulParams& out,
                                       int splits, cudaStream_t stream);

// The same passes on wgmma (conv2d_sm90a.cuh), in tilesmith._C_sm90a (see
// common/hopper_kernels.h): the same calls as the sm_80 kernels.
cudaError_t run_conv2d_fwd_sm90a_bf16(const ConvParams& conv, const MatmulParams& out,
                                      cudaStream_t stream);
cudaError_t run_conv2d_fwd_sm90a_fp16(const ConvParams& conv, const MatmulParams& out,
                                      cudaStream_t stream);
cudaError_t run_conv2d_dgrad_sm90a_bf16(const ConvParams& conv, const MatmulParams& out,
                                        cudaStream_t stream);
cudaError_t run_conv2d_dgrad_sm90a_fp16(const ConvParams& conv, const MatmulParams& out,
                                        cudaStream_t stream);
cudaError_t run_conv2d_wgrad_sm90a_bf16(const ConvParams& conv, const MatmulParams& out,
                                        int splits, cudaStream_t stream);
cudaError_t run_conv2d_wgrad_sm90a_fp16(const ConvParams& conv, const MatmulParams& out,
                                        int splits, cudaStream_t stream);

}  // namespace tilesmith

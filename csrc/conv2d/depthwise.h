// The plain interface for the depthwise kernels (groups = channels = filters): activations
// channels-last and contiguous, x (N, H, W, C), grad_out (N, P, Q, C); the weight as
// (R, S, C), C contiguous (the (C, 1, R, S) weight transposed).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../matmul/matmul.h"

namespace tilesmith {

struct DepthwiseParams {
  const void* x = nullptr;
  const void* weight = nullptr;     // (R, S, C)
  const void* grad_out = nullptr;
  void* out = nullptr;              // forward: (N, P, Q, C); dgrad: (N, H, W, C)
  void* pre = nullptr;              // forward: the pre-activation, like out, or nullptr
  const void* residual = nullptr;   // forward: added before the activation, like out, or nullptr
  float* weight_grad = nullptr;     // wgrad: fp32 partials (splits, R, S, C)
  const float* bias = nullptr;      // (C,) fp32 or nullptr
  Activation activation = Activation::kNone;
  int64_t batch, height, width, channels, kernel_h, kernel_w, out_h, out_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t split_pixels = 0;         // wgrad: output pixels per split
};

// Direct convolution, 8 channels (16 bytes) per thread, fp32 accumulation; C % 8 == 0.
cudaError_t run_depthwise_fwd_bf16(const DepthwiseParams& p, cudaStream_t stream);
cudaError_t run_depthwise_fwd_fp16(const DepthwiseParams& p, cudaStream_t stream);
cudaError_t run_depthwise_dgrad_bf16(const DepthwiseParams& p, cudaStream_t stream);
cudaError_t run_depthwise_dgrad_fp16(const DepthwiseParams& p, cudaStream_t stream);
cudaError_t run_depthwise_wgrad_bf16(const DepthwiseParams& p, int splits, cudaStream_t stream);
cudaError_t run_depthwise_wgrad_fp16(const DepthwiseParams& p, int splits, cudaStream_t stream);

}  // namespace tilesmith

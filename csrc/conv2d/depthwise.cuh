// Depthwise conv2d (groups = channels = filters) for sm_80 and newer: direct convolution, no
// tensor cores. A depthwise layer does R*S multiply-adds per output element, so it is bound by
// memory traffic, not by math: each thread owns 8 consecutive channels (one 16-byte load of
// channels-last data per tap) of one pixel, and neighbouring threads own neighbouring
// channels, so a warp's loads are contiguous. fp32 accumulation.
//   forward  out[n, p, q, c] = act(sum_{r,s} x[n, p*st - pad + r*dil, ..., c] * w[r, s, c] + b)
//   dgrad    dx[n, h, w, c]  = sum_{r,s} dy[n, (h + pad - r*dil) / st, ..., c] * w[r, s, c]
//            (taps where the division is not exact, or out of range, contribute nothing)
//   wgrad    partial[split, r, s, c] = sum over the split's output pixels of dy * x
#pragma once

#include "../matmul/mainloop_sm80.cuh"
#include "depthwise.h"

namespace tilesmith {
namespace depthwise {

constexpr int kThreads = 256;
constexpr int kVector = 8;  // channels per thread: 16 bytes of fp16/bf16

template <typename T>
__device__ __forceinline__ void load8(float (&v)[kVector], const T* src) {
  const uint4 bits = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&bits);
#pragma unroll
  for (int j = 0; j < kVector; ++j) v[j] = to_float<T>(e[j]);
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&v)[kVector]) {
  alignas(16) T e[kVector];
#pragma unroll
  for (int j = 0; j < kVector; ++j) e[j] = from_float<T>(v[j]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(e);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) depthwise_fwd_kernel(const DepthwiseParams p) {
  const int64_t chunks = p.channels / kVector;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= p.batch * p.out_h * p.out_w * chunks) return;
  const int64_t pixel = index / chunks, c0 = (index % chunks) * kVector;
  const int64_t n = pixel / (p.out_h * p.out_w), rest = pixel % (p.out_h * p.out_w);
  const int top = static_cast<int>(rest / p.out_w) * p.stride_h - p.pad_h;
  const int left = static_cast<int>(rest % p.out_w) * p.stride_w - p.pad_w;
  const T* x = static_cast<const T*>(p.x) + n * p.height * p.width * p.channels + c0;
  const T* w = static_cast<const T*>(p.weight) + c0;

  float acc[kVector];
#pragma unroll
  for (int j = 0; j < kVector; ++j) acc[j] = p.bias != nullptr ? p.bias[c0 + j] : 0.0f;
  for (int r = 0; r < p.kernel_h; ++r) {
    const int ih = top + r * p.dilation_h;
    if (ih < 0 || ih >= p.height) continue;
    for (int s = 0; s < p.kernel_w; ++s) {
      const int iw = left + s * p.dilation_w;
      if (iw < 0 || iw >= p.width) continue;
      float xv[kVector], wv[kVector];
      load8<T>(xv, x + (static_cast<int64_t>(ih) * p.width + iw) * p.channels);
      load8<T>(wv, w + (r * p.kernel_w + s) * p.channels);
#pragma unroll
      for (int j = 0; j < kVector; ++j) acc[j] = fmaf(xv[j], wv[j], acc[j]);
    }
  }
  const int64_t at = pixel * p.channels + c0;
  if (p.residual != nullptr) {
    float rv[kVector];
    load8<T>(rv, static_cast<const T*>(p.residual) + at);
#pragma unroll
    for (int j = 0; j < kVector; ++j) acc[j] += rv[j];
  }
  if (p.pre != nullptr) store8<T>(static_cast<T*>(p.pre) + at, acc);
#pragma unroll
  for (int j = 0; j < kVector; ++j) acc[j] = activate(acc[j], p.activation);
  store8<T>(static_cast<T*>(p.out) + at, acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) depthwise_dgrad_kernel(const DepthwiseParams p) {
  const int64_t chunks = p.channels / kVector;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= p.batch * p.height * p.width * chunks) return;
  const int64_t pixel = index / chunks, c0 = (index % chunks) * kVector;
  const int64_t n = pixel / (p.height * p.width), rest = pixel % (p.height * p.width);
  const int padded_h = static_cast<int>(rest / p.width) + p.pad_h;
  const int padded_w = static_cast<int>(rest % p.width) + p.pad_w;
  const T* dy = static_cast<const T*>(p.grad_out) + n * p.out_h * p.out_w * p.channels + c0;
  const T* w = static_cast<const T*>(p.weight) + c0;

  float acc[kVector] = {};
  for (int r = 0; r < p.kernel_h; ++r) {
    const int y = padded_h - r * p.dilation_h;
    const int oh = y / p.stride_h;
    if (y < 0 || oh * p.stride_h != y || oh >= p.out_h) continue;
    for (int s = 0; s < p.kernel_w; ++s) {
      const int x = padded_w - s * p.dilation_w;
      const int ow = x / p.stride_w;
      if (x < 0 || ow * p.stride_w != x || ow >= p.out_w) continue;
      float gv[kVector], wv[kVector];
      load8<T>(gv, dy + (static_cast<int64_t>(oh) * p.out_w + ow) * p.channels);
      load8<T>(wv, w + (r * p.kernel_w + s) * p.channels);
#pragma unroll
      for (int j = 0; j < kVector; ++j) acc[j] = fmaf(gv[j], wv[j], acc[j]);
    }
  }
  store8<T>(static_cast<T*>(p.out) + pixel * p.channels + c0, acc);
}

// Thread (tap, chunk) of split blockIdx.y: its 8 channels of one tap's weight gradient over
// the split's output pixels; consecutive threads take consecutive chunks of one tap.
template <typename T>
__global__ void __launch_bounds__(kThreads) depthwise_wgrad_kernel(const DepthwiseParams p) {
  const int64_t chunks = p.channels / kVector;
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= taps * chunks) return;
  const int tap = static_cast<int>(index / chunks);
  const int64_t c0 = (index % chunks) * kVector;
  const int dy_off = (tap / static_cast<int>(p.kernel_w)) * p.dilation_h - p.pad_h;
  const int dx_off = (tap % static_cast<int>(p.kernel_w)) * p.dilation_w - p.pad_w;
  const int64_t pixels = p.batch * p.out_h * p.out_w;
  const int64_t begin = blockIdx.y * p.split_pixels;
  const int64_t end = begin + p.split_pixels < pixels ? begin + p.split_pixels : pixels;
  const T* x = static_cast<const T*>(p.x) + c0;
  const T* dy = static_cast<const T*>(p.grad_out) + c0;

  float acc[kVector] = {};
  for (int64_t pixel = begin; pixel < end; ++pixel) {
    const int64_t n = pixel / (p.out_h * p.out_w), rest = pixel % (p.out_h * p.out_w);
    const int ih = static_cast<int>(rest / p.out_w) * p.stride_h + dy_off;
    const int iw = static_cast<int>(rest % p.out_w) * p.stride_w + dx_off;
    if (ih < 0 || ih >= p.height || iw < 0 || iw >= p.width) continue;
    float gv[kVector], xv[kVector];
    load8<T>(gv, dy + pixel * p.channels);
    load8<T>(xv, x + ((n * p.height + ih) * p.width + iw) * p.channels);
#pragma unroll
    for (int j = 0; j < kVector; ++j) acc[j] = fmaf(gv[j], xv[j], acc[j]);
  }
  float* out = p.weight_grad + (blockIdx.y * taps + tap) * p.channels + c0;
#pragma unroll
  for (int j = 0; j < kVector; ++j) out[j] = acc[j];
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernels itself
inline unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

template <typename T>
cudaError_t run_fwd(const DepthwiseParams& p, cudaStream_t stream) {
  const int64_t threads = p.batch * p.out_h * p.out_w * (p.channels / kVector);
  if (threads == 0) return cudaSuccess;
  depthwise_fwd_kernel<T><<<blocks_for(threads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_dgrad(const DepthwiseParams& p, cudaStream_t stream) {
  const int64_t threads = p.batch * p.height * p.width * (p.channels / kVector);
  if (threads == 0) return cudaSuccess;
  depthwise_dgrad_kernel<T><<<blocks_for(threads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_wgrad(const DepthwiseParams& p, int splits, cudaStream_t stream) {
  const int64_t threads = p.kernel_h * p.kernel_w * (p.channels / kVector);
  if (threads == 0 || splits == 0) return cudaSuccess;
  const dim3 grid(blocks_for(threads), static_cast<unsigned>(splits));
  depthwise_wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace depthwise
}  // namespace tilesmith

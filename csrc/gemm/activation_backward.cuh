// The backward of a fused activation: dz = grad * act'(pre), and the bias gradient (dz
// summed over rows) in the same pass, so that the elementwise part of gemm's and conv2d's
// backward reads grad and pre once and writes dz once. (The GEMMs that follow read dz: dA
// and dB both need it, so it is materialised once rather than recomputed in two prologues.)
//
// A block of 8 x 32 threads owns kActivationBackwardRows rows of one 32 * kVec column
// strip: lane j of every warp takes columns [j * kVec, (j + 1) * kVec) of the strip (one
// 16-byte load of pre and of an fp16/bf16 grad where the rows allow it, else element by
// element), warp w rows w, w + 8, .... Each thread keeps fp32 sums of its columns; the
// eight warps' sums meet in shared memory and the block writes one row of partial sums,
// which the host side reduces in a fixed order (deterministic, no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/mma_sm80.cuh"
#include "activation_backward.h"

namespace tilesmith {
namespace activation_backward {

constexpr int kLanes = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kLanes * kWarps;
constexpr int kRows = kActivationBackwardRows;

// Must agree with kernels/gemm.py's activation_derivative (the Triton backend's).
__device__ __forceinline__ float derivative(float z, Activation activation) {
  switch (activation) {
    case Activation::kRelu:
      return z <= 0.0f ? 0.0f : 1.0f;  // 1 at a NaN, as torch's threshold_backward
    case Activation::kGelu:
      return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) +
             z * expf(-0.5f * z * z) * 0.39894228040143268f;
    case Activation::kGeluTanh: {
      const float t = tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z));
      return 0.5f * (1.0f + t) +
             0.5f * z * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * z * z);
    }
    case Activation::kSilu: {
      const float s = 1.0f / (1.0f + expf(-z));
      return s * (1.0f + z * (1.0f - s));
    }
    case Activation::kRelu6:  // 0 at a NaN, as torch's hardtanh_backward
      return (z > 0.0f && z < 6.0f) ? 1.0f : 0.0f;
    case Activation::kHardswish:  // as torch's hardswish_backward
      return z <= -3.0f ? 0.0f : (z < 3.0f ? z * (1.0f / 3.0f) + 0.5f : 1.0f);
    case Activation::kSigmoid: {
      const float s = 1.0f / (1.0f + expf(-z));
      return s * (1.0f - s);
    }
    case Activation::kHardsigmoid:  // 0 at a NaN, as torch's hardsigmoid_backward
      return (z > -3.0f && z < 3.0f) ? 1.0f / 6.0f : 0.0f;
    default:
      return 1.0f;
  }
}

// Columns [col, col + kVec) of one row as floats. kVec > 1 only where the launcher found
// unit column strides, 16-byte aligned rows and n a multiple of kVec.
template <typename X, int kVec>
__device__ __forceinline__ void load(const X* row, int64_t col, int64_t col_stride,
                                     float (&v)[kVec]) {
  if constexpr (kVec == 1) {
    v[0] = to_float<X>(row[col * col_stride]);
  } else {
    constexpr int kWords = kVec * static_cast<int>(sizeof(X)) / 16;  // 1, or 2 for fp32
    static_assert(kWords * 16 == kVec * static_cast<int>(sizeof(X)), "whole 16-byte words");
    alignas(16) X raw[kVec];
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      reinterpret_cast<uint4*>(raw)[w] = reinterpret_cast<const uint4*>(row + col)[w];
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = to_float<X>(raw[i]);
  }
}

// T: dz's dtype; G: grad's (T or float); P: pre's (T, or float with G float); kVec:
// columns per thread.
template <typename T, typename G, typename P, int kVec>
__global__ void __launch_bounds__(kThreads) activation_backward_kernel(
    const ActivationBackwardParams p) {
  constexpr int kWidth = kLanes * kVec;  // columns per strip
  extern __shared__ __align__(16) float column_sums[];  // [kWarps][kWidth]
  const int64_t strips = (p.n + kWidth - 1) / kWidth;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) / strips * kRows;
  const int64_t strip_col0 = static_cast<int64_t>(blockIdx.x) % strips * kWidth;
  const int64_t row_end = row0 + kRows < p.m ? row0 + kRows : p.m;
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes;
  const int64_t col = strip_col0 + lane * kVec;

  float sums[kVec] = {};
  if (col < p.n) {
    for (int64_t row = row0 + warp; row < row_end; row += kWarps) {
      float grad[kVec], pre[kVec];
      load<G, kVec>(static_cast<const G*>(p.grad) + row * p.grad_row_stride, col,
                    p.grad_col_stride, grad);
      load<P, kVec>(static_cast<const P*>(p.pre) + row * p.pre_row_stride, col,
                    p.pre_col_stride, pre);
      alignas(16) T dz[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float value = grad[i] * derivative(pre[i], p.activation);
        sums[i] += value;
        dz[i] = from_float<T>(value);
      }
      T* out = static_cast<T*>(p.dz) + row * p.n + col;
      if constexpr (kVec == 1) {
        *out = dz[0];
      } else {
        static_assert(kVec * sizeof(T) == 16, "one 16-byte store");
        *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(dz);
      }
    }
  }
  if (p.bias_partials == nullptr) return;  // uniform across the block

#pragma unroll
  for (int i = 0; i < kVec; ++i) column_sums[warp * kWidth + lane * kVec + i] = sums[i];
  __syncthreads();
  // Thread t adds column t of the strip (kWidth <= kThreads) over the warps, in warp order.
  const int c = threadIdx.x;
  if (c < kWidth && strip_col0 + c < p.n) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += column_sums[w * kWidth + c];
    p.bias_partials[row0 / kRows * p.n + strip_col0 + c] = total;
  }
}

// Columns per thread: a 16-byte vector of T when every row of grad, pre and dz allows it
// (fp32 grad and pre rows are then read as two 16-byte words).
template <typename T>
__host__ __device__ inline int vector_width(const ActivationBackwardParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool rows_ok = p.grad_col_stride == 1 && p.pre_col_stride == 1 && p.n % kVec == 0 &&
                       p.grad_row_stride % kVec == 0 && p.pre_row_stride % kVec == 0;
  return rows_ok && aligned(p.grad) && aligned(p.pre) && aligned(p.dz) ? kVec : 1;
}

template <int kVec>
__host__ __device__ inline int64_t blocks(const ActivationBackwardParams& p) {
  const int64_t strips = (p.n + kLanes * kVec - 1) / (kLanes * kVec);
  return (p.m + kRows - 1) / kRows * strips;
}

template <int kVec>
constexpr size_t smem_bytes() {
  return sizeof(float) * kWarps * kLanes * kVec;
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, typename G, typename P, int kVec>
cudaError_t launch(const ActivationBackwardParams& p, cudaStream_t stream) {
  activation_backward_kernel<T, G, P, kVec>
      <<<static_cast<unsigned>(blocks<kVec>(p)), kThreads, smem_bytes<kVec>(), stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename G, typename P>
cudaError_t run(const ActivationBackwardParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return vector_width<T>(p) == kVec ? launch<T, G, P, kVec>(p, stream)
                                    : launch<T, G, P, 1>(p, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace activation_backward
}  // namespace tilesmith

// What the sm_80 (mma.sync) and sm_90a (wgmma) forward convolutions share: the group's
// part of the output, and the gathered operand: a stage tile of kRows output pixels x 64
// input channels at one filter tap, copied straight from the channels-last input with
// cp.async (no im2col buffer). Each 16-byte chunk is 8 consecutive channels of one pixel;
// padding and image borders are chunks cp.async zero-fills. The tile is stored row by row,
// 128 bytes a row, the chunks of row r permuted by XOR with (r % 8): SwizzledTile<kRows,
// 64>, which is also the K-major layout of wgmma's 128-byte swizzle.
#pragma once

#include "../common/mma_sm80.cuh"
#include "conv2d.h"

namespace tilesmith {

// A coordinate that stays out of range after adding any tap offset: marks padding rows.
constexpr int kInvalidPixel = -(1 << 30);

template <typename T, int kThreads, int kRows>
struct ForwardGather {
  static constexpr int kChunksPerRow = 8;  // 64 channels
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0, "every pass starts a whole swizzle period down");

  const ConvParams& cp;
  const T* x;             // this group's first channel
  int64_t pixel_stride;   // x's elements per pixel (all groups' channels)
  int row, col;           // this thread's first row and its channel column in the tile
  // For each row this thread copies: its image's offset in x and the input coordinates of
  // the receptive field's top-left corner (kInvalidPixel past the last pixel). Worked out
  // once per block; the taps step from there.
  int64_t image[kPasses];
  int top[kPasses], left[kPasses];

  __device__ __forceinline__ ForwardGather(const ConvParams& params, int64_t group,
                                           int64_t pixels, int64_t pixel0)
      : cp(params),
        x(static_cast<const T*>(params.x) + group * params.channels),
        pixel_stride(params.channels * params.groups),
        row(threadIdx.x / kChunksPerRow),
        col((threadIdx.x % kChunksPerRow) * 8) {
    const int64_t per_image = cp.out_h * cp.out_w;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int64_t pixel = pixel0 + row + i * kRowsPerPass;
      const int64_t n = pixel / per_image, rest = pixel % per_image;
      const bool valid = pixel < pixels;
      image[i] = valid ? n * cp.height * cp.width * pixel_stride : 0;
      top[i] = valid ? static_cast<int>(rest / cp.out_w) * cp.stride_h - cp.pad_h
                     : kInvalidPixel;
      left[i] = valid ? static_cast<int>(rest % cp.out_w) * cp.stride_w - cp.pad_w
                      : kInvalidPixel;
    }
  }

  // The stage tile at `tile` of channels [c0, c0 + 64) at filter tap `tap` (r * S + s).
  __device__ __forceinline__ void load(T* tile, int tap, int64_t c0) const {
    const int dy = (tap / static_cast<int>(cp.kernel_w)) * cp.dilation_h;
    const int dx = (tap % static_cast<int>(cp.kernel_w)) * cp.dilation_w;
    T* dst = tile + row * 64 + (((col >> 3) ^ (row & 7)) << 3);
    const bool col_ok = c0 + col < cp.channels;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int ih = top[i] + dy, iw = left[i] + dx;
      const bool ok = col_ok && ih >= 0 && ih < cp.height && iw >= 0 && iw < cp.width;
      const T* src =
          x + image[i] + (static_cast<int64_t>(ih) * cp.width + iw) * pixel_stride + c0 + col;
      cp_async_16(dst + i * kRowsPerPass * 64, ok ? src : x, ok ? 16 : 0);
    }
  }
};

// Group `group`'s columns of the output, bias and pre-activation (`out` describes group 0's).
template <typename T>
__device__ __forceinline__ MatmulParams group_output(const MatmulParams& out, int64_t group,
                                                     int64_t filters) {
  MatmulParams in_group = out;
  const int64_t first = group * filters;
  in_group.c = static_cast<T*>(out.c) + first;
  if (out.bias != nullptr) in_group.bias = out.bias + first;
  if (out.pre != nullptr) in_group.pre = static_cast<T*>(out.pre) + first;
  return in_group;
}

}  // namespace tilesmith

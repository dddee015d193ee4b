// What the sm_80 (mma.sync) and sm_90a (wgmma) convolutions share: the gathered operands,
// copied straight from the channels-last activations with cp.async (no im2col buffer), and
// the group's part of the output. Every 16-byte chunk is 8 consecutive channels of one
// pixel; padding and image borders are chunks cp.async zero-fills.
//
// ForwardGather and DgradGather fill a stage tile of kRows pixels x 64 channels at one
// filter tap, stored row by row, 128 bytes a row, the chunks of row r permuted by XOR with
// (r % 8): SwizzledTile<kRows, 64>, which is also the K-major layout of wgmma's 128-byte
// swizzle. Each thread works out the pixels of the rows it copies once per block and steps
// through the taps from there.
#pragma once

#include "../common/tiles_sm80.cuh"
#include "conv2d.h"

namespace tilesmith {

// A coordinate that stays out of range after adding any tap offset: marks padding rows.
constexpr int kInvalidPixel = -(1 << 30);

// The rows of a kRows x 64 stage tile one thread of kThreads copies (kRowsPerPass apart,
// from `row`) and its chunk column `col`.
template <int kThreads, int kRows>
struct GatherRows {
  static constexpr int kChunksPerRow = 8;  // 64 channels
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0, "every pass starts a whole swizzle period down");

  int row = threadIdx.x / kChunksPerRow, col = (threadIdx.x % kChunksPerRow) * 8;

  // Where this thread's chunk of pass i lands in the swizzled tile.
  template <typename T>
  __device__ __forceinline__ T* chunk(T* tile, int i) const {
    return tile + SwizzledTile<kRows, 64>::offset(row + i * kRowsPerPass, col);
  }
};

// The forward's A operand: output pixels x input channels at one tap.
template <typename T, int kThreads, int kRows>
struct ForwardGather : GatherRows<kThreads, kRows> {
  using Rows = GatherRows<kThreads, kRows>;
  using Rows::col, Rows::row, Rows::kPasses, Rows::kRowsPerPass;

  const ConvParams& cp;
  const T* x;             // this group's first channel
  int64_t pixel_stride;   // x's elements per pixel (all groups' channels)
  // For each row this thread copies: its image's offset in x and the input coordinates of
  // the receptive field's top-left corner (kInvalidPixel past the last pixel).
  int64_t image[kPasses];
  int top[kPasses], left[kPasses];

  __device__ __forceinline__ ForwardGather(const ConvParams& params, int64_t group,
                                           int64_t pixels, int64_t pixel0)
      : cp(params),
        x(static_cast<const T*>(params.x) + group * params.channels),
        pixel_stride(params.channels * params.groups) {
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
    const bool col_ok = c0 + col < cp.channels;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int ih = top[i] + dy, iw = left[i] + dx;
      const bool ok = col_ok && ih >= 0 && ih < cp.height && iw >= 0 && iw < cp.width;
      const T* src =
          x + image[i] + (static_cast<int64_t>(ih) * cp.width + iw) * pixel_stride + c0 + col;
      cp_async_16(this->chunk(tile, i), ok ? src : x, ok ? 16 : 0);
    }
  }
};

// Input pixel (h, w) receives tap (r, s) only from an output pixel (p, q) with
// h + pad_h - r dil_h = p stride_h (and likewise along w), so which taps reach a pixel depends
// only on its phase (h % stride_h, w % stride_w). dgrad runs one GEMM per phase (grid z):
// its rows are the phase's pixels, its reduction only the taps that reach them, where a
// single GEMM over every pixel and tap would multiply stride_h * stride_w times as many
// zero-filled chunks as real ones. Stride 1 is one phase: every pixel, every tap, in order.
struct DgradPhase {
  // The taps along one axis that reach a phase: first + i * step for i < count. They form a
  // progression because r and r + stride / gcd(dilation, stride) always agree.
  struct Taps {
    int first = 0, step = 1, count = 0;
  };

  const ConvParams& cp;
  int phase_h, phase_w;  // h % stride_h, w % stride_w of the phase's pixels
  int rows, cols;        // per image: h = phase_h + i stride_h (i < rows), w likewise (cols)
  int64_t pixels;        // batch * rows * cols: the GEMM's rows
  Taps along_h, along_w;

  __device__ __forceinline__ DgradPhase(const ConvParams& params, int phase)
      : cp(params), phase_h(phase / params.stride_w), phase_w(phase % params.stride_w) {
    const int height = static_cast<int>(cp.height), width = static_cast<int>(cp.width);
    rows = phase_h < height ? (height - phase_h + cp.stride_h - 1) / cp.stride_h : 0;
    cols = phase_w < width ? (width - phase_w + cp.stride_w - 1) / cp.stride_w : 0;
    pixels = cp.batch * rows * cols;
    along_h = taps(phase_h + cp.pad_h, cp.dilation_h, cp.stride_h, cp.kernel_h);
    along_w = taps(phase_w + cp.pad_w, cp.dilation_w, cp.stride_w, cp.kernel_w);
  }

  __device__ __forceinline__ static Taps taps(int padded, int dilation, int stride,
                                              int64_t kernel) {
    Taps t;
    for (int r = 0; r < kernel; ++r) {
      if ((padded - r * dilation) % stride != 0) continue;  // C's remainder: 0 iff divisible
      if (t.count == 0) t.first = r;
      if (t.count == 1) t.step = r - t.first;
      ++t.count;
    }
    return t;
  }

  __device__ __forceinline__ int tap_count() const { return along_h.count * along_w.count; }

  // The phase's i-th tap, as r * S + s.
  __device__ __forceinline__ int tap(int i) const {
    const int r = along_h.first + (i / along_w.count) * along_h.step;
    const int s = along_w.first + (i % along_w.count) * along_w.step;
    return r * static_cast<int>(cp.kernel_w) + s;
  }

  // Where GEMM row `row` (< pixels) lies: image n, input coordinates (h, w).
  __device__ __forceinline__ void locate(int64_t row, int64_t& n, int& h, int& w) const {
    const int64_t per_image = static_cast<int64_t>(rows) * cols;
    n = row / per_image;
    const int rest = static_cast<int>(row - n * per_image);  // an image's pixels fit 32 bits
    h = phase_h + rest / cols * cp.stride_h;
    w = phase_w + rest % cols * cp.stride_w;
  }

  // GEMM row `row` as an index into dx's N*H*W pixels.
  __device__ __forceinline__ int64_t pixel(int64_t row) const {
    int64_t n;
    int h, w;
    locate(row, n, h, w);
    return (n * cp.height + h) * cp.width + w;
  }
};

// Writes a phase's GEMM rows to the pixels they stand for (`out` addresses dx by pixel).
template <typename Writer>
struct PhaseWriter {
  const Writer& out;
  const DgradPhase& phase;

  __device__ __forceinline__ int64_t place(int64_t row) const {
    return row < phase.pixels ? out.place(phase.pixel(row)) : -1;
  }

  __device__ __forceinline__ void write(int64_t placed_row, int64_t col, float acc0,
                                        float acc1) const {
    out.write(placed_row, col, acc0, acc1);
  }
};

// dgrad's A operand: a phase's input pixels x output channels (filters) of grad_out at one
// of the taps that reach them, from output pixel (p, q) = ((h + pad - r dil) / stride, ...),
// an exact division; zeros where (p, q) lies outside grad_out.
template <typename T, int kThreads, int kRows>
struct DgradGather : GatherRows<kThreads, kRows> {
  using Rows = GatherRows<kThreads, kRows>;
  using Rows::col, Rows::row, Rows::kPasses, Rows::kRowsPerPass;

  const ConvParams& cp;
  const T* grad_out;      // this group's first filter
  int64_t pixel_stride;   // grad_out's elements per pixel (all groups' filters)
  // For each row this thread copies: its image's offset in grad_out and its padded input
  // coordinates (kInvalidPixel past the phase's last pixel).
  int64_t image[kPasses];
  int padded_h[kPasses], padded_w[kPasses];

  __device__ __forceinline__ DgradGather(const ConvParams& params, const DgradPhase& phase,
                                         int64_t group, int64_t row0)
      : cp(params),
        grad_out(static_cast<const T*>(params.grad_out) + group * params.filters),
        pixel_stride(params.filters * params.groups) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      // Rows past the phase's pixels locate to somewhere harmless (the phase has some:
      // its blocks exit otherwise) and are marked invalid.
      const int64_t gemm_row = row0 + row + i * kRowsPerPass;
      const bool valid = gemm_row < phase.pixels;
      int64_t n;
      int h, w;
      phase.locate(gemm_row, n, h, w);
      image[i] = valid ? n * cp.out_h * cp.out_w * pixel_stride : 0;
      padded_h[i] = valid ? h + cp.pad_h : kInvalidPixel;
      padded_w[i] = valid ? w + cp.pad_w : kInvalidPixel;
    }
  }

  // The stage tile at `tile` of filters [k0, k0 + 64) at filter tap `tap` (r * S + s), one
  // of the phase's.
  __device__ __forceinline__ void load(T* tile, int tap, int64_t k0) const {
    const int dy = (tap / static_cast<int>(cp.kernel_w)) * cp.dilation_h;
    const int dx = (tap % static_cast<int>(cp.kernel_w)) * cp.dilation_w;
    const bool col_ok = k0 + col < cp.filters;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int y = padded_h[i] - dy, x = padded_w[i] - dx;
      const int p = y / cp.stride_h, q = x / cp.stride_w;
      const bool ok = col_ok && y >= 0 && x >= 0 && p < cp.out_h && q < cp.out_w;
      const T* src = grad_out + image[i] +
                     (static_cast<int64_t>(p) * cp.out_w + q) * pixel_stride + k0 + col;
      cp_async_16(this->chunk(tile, i), ok ? src : grad_out, ok ? 16 : 0);
    }
  }
};

// A wgrad block (tile, group * taps + tap, split): its group and filter tap, its split of
// the output pixels [begin, end) (the reduction), and the input pixel each output pixel
// reads at the tap (the gathered operand's rows).
struct WgradBlock {
  const ConvParams& cp;
  int64_t group, begin, end;
  int tap, dy, dx;  // dy, dx: from an output pixel's stride-scaled position to its input

  __device__ __forceinline__ explicit WgradBlock(const ConvParams& params) : cp(params) {
    const int taps = static_cast<int>(cp.kernel_h * cp.kernel_w);
    group = blockIdx.y / taps;
    tap = blockIdx.y % taps;
    dy = (tap / static_cast<int>(cp.kernel_w)) * cp.dilation_h - cp.pad_h;
    dx = (tap % static_cast<int>(cp.kernel_w)) * cp.dilation_w - cp.pad_w;
    const int64_t pixels = cp.batch * cp.out_h * cp.out_w;
    begin = blockIdx.z * cp.split_pixels;
    end = begin + cp.split_pixels < pixels ? begin + cp.split_pixels : pixels;
  }

  // Steps of kBlockK pixels through the split.
  template <int kBlockK>
  __device__ __forceinline__ int k_tiles() const {
    return end > begin ? static_cast<int>((end - begin + kBlockK - 1) / kBlockK) : 0;
  }

  // What the block writes of partial[split] (described by `out`): its group's rows, its
  // tap's columns of the (K, R*S*C) weight gradient.
  __device__ __forceinline__ MatmulParams output(const MatmulParams& out) const {
    MatmulParams at_tap = out;
    at_tap.c = static_cast<float*>(out.c) + group * cp.filters * out.c_row_stride +
               tap * cp.channels;
    return at_tap;
  }

  // The input pixel output pixel `pixel` reads at the tap, as an index into x's N*H*W
  // pixels; -1 where that is padding or `pixel` lies past the split.
  __device__ __forceinline__ int64_t input_pixel(int64_t pixel) const {
    if (pixel >= end) return -1;
    const int64_t per_image = cp.out_h * cp.out_w;
    const int64_t n = pixel / per_image;
    // The rest in 32 bits (an image's pixels fit): one 64-bit division per row, not three.
    const int rest = static_cast<int>(pixel - n * per_image), out_w = static_cast<int>(cp.out_w);
    const int ih = rest / out_w * cp.stride_h + dy;
    const int iw = rest % out_w * cp.stride_w + dx;
    if (ih < 0 || ih >= cp.height || iw < 0 || iw >= cp.width) return -1;
    return (n * cp.height + ih) * cp.width + iw;
  }
};

// The grid of a pass, kBlockM x kBlockN output tiles: tiles x groups x dgrad's phases (the
// tiles of the largest phase), or for wgrad tiles x groups * taps x splits of the reduction.
template <int kBlockM, int kBlockN>
dim3 conv_grid(ConvPass pass, const ConvParams& cp, const MatmulParams& out, int splits) {
  const int64_t rows = pass == kDgrad ? dgrad_rows_per_phase(cp) : out.m;
  const auto tiles = static_cast<unsigned>(tile_count<kBlockM, kBlockN>(rows, out.n));
  if (pass == kWgrad) {
    return dim3(tiles, static_cast<unsigned>(cp.groups * cp.kernel_h * cp.kernel_w),
                static_cast<unsigned>(splits));
  }
  return dim3(tiles, static_cast<unsigned>(cp.groups),
              pass == kDgrad ? static_cast<unsigned>(dgrad_phases(cp)) : 1u);
}

// Group `group`'s columns of the output, bias, residual and pre-activation (`out` describes
// group 0's, `columns` wide: filters for the forward, channels for dgrad).
template <typename T>
__device__ __forceinline__ MatmulParams group_output(const MatmulParams& out, int64_t group,
                                                     int64_t columns) {
  MatmulParams in_group = out;
  const int64_t first = group * columns;
  in_group.c = static_cast<T*>(out.c) + first;
  if (out.bias != nullptr) in_group.bias = out.bias + first;
  if (out.pre != nullptr) in_group.pre = static_cast<T*>(out.pre) + first;
  if (out.residual != nullptr) in_group.residual = static_cast<const T*>(out.residual) + first;
  return in_group;
}

}  // namespace tilesmith

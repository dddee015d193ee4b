// FP8 quantization (ops/fp8.py's quantize_fp8): amax per group, scale = amax / FP8_MAX, and
// q = x * (FP8_MAX / amax) saturated and rounded to nearest even. The arithmetic is that of
// kernels/fp8.py and tilesmith.testing.quantize_fp8_reference, bit for bit: amax floored at
// 1e-12, the reciprocal divided in fp64 and rounded once to fp32, the product in fp32, and
// the conversion's satfinite doing the clamp to +-FP8_MAX.
//
// A block of 8 warps owns one group of rows. Each warp walks whole row segments, lane i
// taking kVec consecutive elements of every 32 * kVec wide step (16-byte loads where the
// rows allow), so the amax of a row or of a 1 x block_k piece is one warp reduction, and a
// block_m x block_k tile's one more across the warps through shared memory. The cast pass
// then reads the segment again (from L1/L2: a row of 16K bf16 is 32 KiB). Per-tensor
// scaling takes two kernels: tile amaxes folded into a device float by an atomic max, then
// the cast pass reading it, so nothing waits for the host. A column-major x (a transposed
// view) has its own kernel, quantize_column_major_kernel, which reads columns in tiles and
// transposes them through shared memory.
//
// Nothing here needs sm_90a; it lives in tilesmith._C_sm90a beside the scaled GEMM it
// feeds, so the cuda fp8 backend is one extension. On sm_89 and newer the conversion is the
// hardware cvt.rn.satfinite.{e4m3,e5m2}x2.f32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>

#include "quantize.h"

namespace tilesmith {
namespace fp8_quantize {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Blocks per SM the kernels are compiled for (at most 64 registers a thread). Without a
// minimum, ptxas kept 32 registers and spilled around the division's slow-path call.
constexpr int kMinBlocks = 4;
// Per-tensor scaling: a warp covers this many 32 * kVec wide steps of its row per block.
constexpr int kTensorSteps = 8;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// The larger of a and b, NaN if either is, as torch.amax (fmaxf would drop the NaN).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// The maximum over the block of each warp's `warp_amax` (all threads get it).
__device__ __forceinline__ float block_max(float warp_amax, float* shared) {
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = warp_amax;
  __syncthreads();
  float amax = shared[0];
  for (int w = 1; w < kWarps; ++w) amax = nan_max(amax, shared[w]);
  return amax;
}

// The rows and columns a block covers: blockIdx.x counts groups of rows (8, one per warp,
// or block_m for 2-D tiles), blockIdx.y groups of columns (the whole row, one block_k
// piece, or for per-tensor scaling kTensorSteps steps).
struct Group {
  int64_t row0, row_end, col0, col_end;
};

template <int kVec>
__host__ __device__ inline int64_t group_width(const QuantizeParams& p) {
  switch (p.granularity) {
    case Granularity::kTensor: return 32 * kVec * kTensorSteps;
    case Granularity::kRow: return p.k;
    default: return p.block_k;
  }
}

__host__ __device__ inline int64_t group_rows(const QuantizeParams& p) {
  return p.granularity == Granularity::kBlock2d ? p.block_m : kWarps;
}

template <int kVec>
__device__ __forceinline__ Group group_of(const QuantizeParams& p) {
  const int64_t rows = group_rows(p), width = group_width<kVec>(p);
  Group g;
  g.row0 = static_cast<int64_t>(blockIdx.x) * rows;
  g.row_end = g.row0 + rows < p.m ? g.row0 + rows : p.m;
  g.col0 = static_cast<int64_t>(blockIdx.y) * width;
  g.col_end = g.col0 + width < p.k ? g.col0 + width : p.k;
  return g;
}

// x[row, col .. col + kVec) as floats. kVec > 1 only where the launcher found the rows
// contiguous and 16-byte aligned with k a multiple of kVec.
template <typename T, int kVec>
__device__ __forceinline__ void load(const QuantizeParams& p, int64_t row, int64_t col,
                                     float (&v)[kVec]) {
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  if constexpr (kVec == 1) {
    v[0] = to_float(x[col * p.x_col_stride]);
  } else {
    static_assert(kVec * sizeof(T) == 16, "one 16-byte load per step");
    alignas(16) T raw[kVec];
    *reinterpret_cast<uint4*>(raw) = *reinterpret_cast<const uint4*>(x + col);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = to_float(raw[i]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ float segment_amax(const QuantizeParams& p, int64_t row,
                                              const Group& g) {
  float amax = 0.f;
  for (int64_t col = g.col0 + (threadIdx.x % 32) * kVec; col < g.col_end; col += 32 * kVec) {
    float v[kVec];
    load<T, kVec>(p, row, col, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) amax = nan_max(amax, fabsf(v[i]));
  }
  return amax;
}

template <bool kE5m2>
__device__ __forceinline__ uint16_t to_fp8x2(float lo, float hi) {
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE,
                                  kE5m2 ? __NV_E5M2 : __NV_E4M3);
}

template <typename T, bool kE5m2, int kVec>
__device__ __forceinline__ void cast_segment(const QuantizeParams& p, int64_t row,
                                             const Group& g, float inverse) {
  uint8_t* q = static_cast<uint8_t*>(p.q) + row * p.k;
  for (int64_t col = g.col0 + (threadIdx.x % 32) * kVec; col < g.col_end; col += 32 * kVec) {
    float v[kVec];
    load<T, kVec>(p, row, col, v);
    if constexpr (kVec == 1) {
      q[col] = static_cast<uint8_t>(
          __nv_cvt_float_to_fp8(v[0] * inverse, __NV_SATFINITE, kE5m2 ? __NV_E5M2 : __NV_E4M3));
    } else {
      uint32_t words[kVec / 4];  // four fp8 values each, the first in the low byte
#pragma unroll
      for (int i = 0; i < kVec; i += 4) {
        words[i / 4] = to_fp8x2<kE5m2>(v[i] * inverse, v[i + 1] * inverse) |
                       static_cast<uint32_t>(to_fp8x2<kE5m2>(v[i + 2] * inverse,
                                                             v[i + 3] * inverse))
                           << 16;
      }
      if constexpr (kVec == 8) {
        *reinterpret_cast<uint2*>(q + col) = make_uint2(words[0], words[1]);
      } else {
        *reinterpret_cast<uint32_t*>(q + col) = words[0];
      }
    }
  }
}

// Per-tensor stage 1: the block's amax, folded into *p.amax (zeroed by the caller). Floats
// >= 0 order as their bit patterns, and a NaN's (sign cleared by fabsf) are above +inf's,
// so an unsigned atomic max is the float max and keeps a NaN as torch.amax does.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocks) tensor_amax_kernel(const QuantizeParams p) {
  extern __shared__ float quantize_warp_amax[];  // kWarps floats
  const Group g = group_of<kVec>(p);
  const int64_t row = g.row0 + threadIdx.x / 32;
  const float amax = block_max(warp_max(row < g.row_end ? segment_amax<T, kVec>(p, row, g)
                                                        : 0.f),
                               quantize_warp_amax);
  if (threadIdx.x == 0) {
    uint32_t bits;
    std::memcpy(&bits, &amax, sizeof bits);
    atomicMax(reinterpret_cast<unsigned int*>(p.amax), bits);
  }
}

template <typename T, bool kE5m2, int kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocks) quantize_kernel(const QuantizeParams p) {
  extern __shared__ float quantize_warp_amax[];  // kWarps floats
  const Group g = group_of<kVec>(p);
  const int warp = threadIdx.x / 32;
  float amax;
  if (p.granularity == Granularity::kTensor) {
    amax = *p.amax;
  } else {
    amax = 0.f;
    for (int64_t row = g.row0 + warp; row < g.row_end; row += kWarps) {
      amax = nan_max(amax, segment_amax<T, kVec>(p, row, g));
    }
    amax = warp_max(amax);
    if (p.granularity == Granularity::kBlock2d) amax = block_max(amax, quantize_warp_amax);
  }
  // The reference divides in fp64 and rounds to fp32; a correctly rounded fp32 division
  // gives the same bits (a 53-bit quotient is wide enough that rounding it again to 24 bits
  // never differs from rounding once), without fp64's division routine.
  constexpr float kFp8Max = kE5m2 ? 57344.f : 448.f;
  const float floored = nan_max(amax, 1e-12f);
  const float inverse = __fdiv_rn(kFp8Max, floored);
  const float scale = __fdiv_rn(floored, kFp8Max);

  const bool first_lane = threadIdx.x % 32 == 0;
  const int64_t row = g.row0 + warp;  // a warp's (only) row, for row and 1-D block scales
  switch (p.granularity) {
    case Granularity::kTensor:
      if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) p.scale[0] = scale;
      break;
    case Granularity::kRow:
      if (first_lane && row < g.row_end) p.scale[row] = scale;
      break;
    case Granularity::kBlock:
      if (first_lane && row < g.row_end) p.scale[row * p.scale_row_stride + blockIdx.y] = scale;
      break;
    case Granularity::kBlock2d:
      if (threadIdx.x == 0) p.scale[blockIdx.x * p.scale_row_stride + blockIdx.y] = scale;
      break;
  }
  for (int64_t r = g.row0 + warp; r < g.row_end; r += kWarps) {
    cast_segment<T, kE5m2, kVec>(p, r, g, inverse);
  }
}

// A column-major x (quantizes_column_major in quantize.h), read in place. A block owns
// kColumnTileRows of x's rows, which are consecutive 16-bit elements of every memory row:
// 64-byte pieces, four threads' 16-byte loads, so each step of the block reads 64 memory
// rows (64 of x's columns) coalesced. The amax of each x row is a reduction across the
// threads that read its column (four lines in a warp by shuffles, then the warps through
// shared memory); the cast pass then transposes kCastColumns columns at a time through a
// shared-memory byte tile, so q's rows are written 16 bytes per thread.
constexpr int kColumnTileRows = 32;
constexpr int kColumnLines = kThreads / (kColumnTileRows / 8);  // memory rows per step: 64
constexpr int kCastColumns = 128;                               // q columns per cast step
// Per-tensor scaling: q columns per block.
constexpr int kColumnTensorWidth = 4 * kCastColumns;

struct ColumnTileShared {
  float warp_amax[kWarps][kColumnTileRows];
  alignas(16) uint8_t q[kColumnTileRows][kCastColumns];
};

// Where column `column` of the byte tile's row `row` lies: its 16-byte chunks permuted by XOR
// with the row's piece (row / 8), so that the four pieces' byte stores of one column, 8 rows
// apart, fall in four different banks rather than one.
__device__ __forceinline__ int cast_tile_column(int row, int column) {
  return column ^ (row / 8 * 16);
}

__host__ __device__ inline int64_t column_group_width(const QuantizeParams& p) {
  switch (p.granularity) {
    case Granularity::kTensor: return kColumnTensorWidth;
    case Granularity::kRow: return p.k;
    default: return p.block_k;
  }
}

template <typename T, bool kE5m2>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    quantize_column_major_kernel(const QuantizeParams p) {
  extern __shared__ __align__(16) unsigned char quantize_column_shared[];
  auto& shared = *reinterpret_cast<ColumnTileShared*>(quantize_column_shared);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kColumnTileRows;
  const int64_t width = column_group_width(p);
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * width;
  const int64_t col_end = col0 + width < p.k ? col0 + width : p.k;
  // This thread's 8 rows of x (rows + 8 piece) and memory line within a step.
  constexpr int kPieces = kColumnTileRows / 8;
  const int piece = threadIdx.x % kPieces, line = threadIdx.x / kPieces;
  const int64_t rows = row0 + 8 * piece;
  const bool rows_ok = rows < p.m;  // m is a multiple of 8: a piece is all in or all out
  const T* x = static_cast<const T*>(p.x) + rows;

  auto load8 = [&](int64_t col, float (&v)[8]) {
    alignas(16) T raw[8];
    *reinterpret_cast<uint4*>(raw) = *reinterpret_cast<const uint4*>(x + col * p.x_col_stride);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(raw[i]);
  };

  float amax[8] = {};
  if (p.granularity == Granularity::kTensor) {
#pragma unroll
    for (int i = 0; i < 8; ++i) amax[i] = *p.amax;
  } else {
    if (rows_ok) {
#pragma unroll 4
      for (int64_t col = col0 + line; col < col_end; col += kColumnLines) {
        float v[8];
        load8(col, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) amax[i] = nan_max(amax[i], fabsf(v[i]));
      }
    }
    // Lanes piece, piece + 4, ... of a warp read the same rows: fold them, then the warps.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      for (int offset = kPieces; offset < 32; offset *= 2) {
        amax[i] = nan_max(amax[i], __shfl_xor_sync(0xffffffffu, amax[i], offset));
      }
    }
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 < kPieces) {
#pragma unroll
      for (int i = 0; i < 8; ++i) shared.warp_amax[warp][8 * piece + i] = amax[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      for (int w = 0; w < kWarps; ++w) {
        amax[i] = nan_max(amax[i], shared.warp_amax[w][8 * piece + i]);
      }
    }
  }

  // Scales as quantize_kernel computes them (the same bits).
  constexpr float kFp8Max = kE5m2 ? 57344.f : 448.f;
  float inverse[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float floored = nan_max(amax[i], 1e-12f);
    inverse[i] = __fdiv_rn(kFp8Max, floored);
    const float scale = __fdiv_rn(floored, kFp8Max);
    const int64_t row = rows + i;
    if (p.granularity == Granularity::kTensor) {
      if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && i == 0) p.scale[0] = scale;
    } else if (line == 0 && rows_ok) {
      p.scale[p.granularity == Granularity::kRow ? row
                                                 : row * p.scale_row_stride + blockIdx.y] = scale;
    }
  }

  uint8_t* q = static_cast<uint8_t*>(p.q);
  for (int64_t c0 = col0; c0 < col_end; c0 += kCastColumns) {
    // Each thread casts two memory rows (x columns) of its 8 rows into the byte tile...
#pragma unroll
    for (int pass = 0; pass < kCastColumns / kColumnLines; ++pass) {
      const int column = line + pass * kColumnLines;
      if (rows_ok && c0 + column < col_end) {
        float v[8];
        load8(c0 + column, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int tile_row = 8 * piece + i;
          shared.q[tile_row][cast_tile_column(tile_row, column)] =
              static_cast<uint8_t>(__nv_cvt_float_to_fp8(v[i] * inverse[i], __NV_SATFINITE,
                                                         kE5m2 ? __NV_E5M2 : __NV_E4M3));
        }
      }
    }
    __syncthreads();
    // ... then writes q's rows from it, 16 bytes a thread (k, and so every group's columns
    // left, is a multiple of 16).
    for (int chunk = threadIdx.x; chunk < kColumnTileRows * kCastColumns / 16;
         chunk += kThreads) {
      const int tile_row = chunk / (kCastColumns / 16);
      const int column = chunk % (kCastColumns / 16) * 16;
      const int64_t row = row0 + tile_row;
      if (row < p.m && c0 + column < col_end) {
        const uint8_t* chunk_bytes = &shared.q[tile_row][cast_tile_column(tile_row, column)];
        *reinterpret_cast<uint4*>(q + row * p.k + c0 + column) =
            *reinterpret_cast<const uint4*>(chunk_bytes);
      }
    }
    __syncthreads();  // the tile is refilled next step
  }
}

// quantize_column_major_kernel's grid: tiles of x's rows x groups of its columns.
inline dim3 column_major_grid(const QuantizeParams& p) {
  const int64_t width = column_group_width(p);
  return dim3(static_cast<unsigned>((p.m + kColumnTileRows - 1) / kColumnTileRows),
              static_cast<unsigned>((p.k + width - 1) / width));
}

// A column-major x described by its memory rows (x^T, row-major): what the per-tensor amax
// kernel reads, the maximum being the same either way.
inline QuantizeParams memory_rows(const QuantizeParams& p) {
  QuantizeParams t = p;
  t.m = p.k;
  t.k = p.m;
  t.x_row_stride = p.x_col_stride;
  t.x_col_stride = 1;
  return t;
}

// The launch grid; the caller (fp8_api.cpp) keeps gridDim.y within 65535.
template <int kVec>
inline dim3 grid_of(const QuantizeParams& p) {
  const int64_t rows = group_rows(p), width = group_width<kVec>(p);
  return dim3(static_cast<unsigned>((p.m + rows - 1) / rows),
              static_cast<unsigned>((p.k + width - 1) / width));
}

// Whether x's rows allow 16-byte loads of kVec elements.
template <typename T>
inline bool rows_vectorizable(const QuantizeParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  return p.x_col_stride == 1 && p.k % kVec == 0 && (p.m == 1 || p.x_row_stride % kVec == 0) &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernels itself
template <typename T, bool kE5m2, int kVec>
cudaError_t launch(const QuantizeParams& p, cudaStream_t stream) {
  const dim3 grid = grid_of<kVec>(p);
  constexpr size_t kSmemBytes = kWarps * sizeof(float);
  if (p.granularity == Granularity::kTensor) {
    tensor_amax_kernel<T, kVec><<<grid, kThreads, kSmemBytes, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  quantize_kernel<T, kE5m2, kVec><<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kE5m2>
cudaError_t launch_column_major(const QuantizeParams& p, cudaStream_t stream) {
  if (p.granularity == Granularity::kTensor) {
    const QuantizeParams by_memory_rows = memory_rows(p);
    tensor_amax_kernel<T, 8><<<grid_of<8>(by_memory_rows), kThreads, kWarps * sizeof(float),
                               stream>>>(by_memory_rows);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  quantize_column_major_kernel<T, kE5m2>
      <<<column_major_grid(p), kThreads, sizeof(ColumnTileShared), stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kE5m2>
cudaError_t run(const QuantizeParams& p, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (quantizes_column_major(p)) return launch_column_major<T, kE5m2>(p, stream);
  }
  return rows_vectorizable<T>(p) ? launch<T, kE5m2, 16 / sizeof(T)>(p, stream)
                                 : launch<T, kE5m2, 1>(p, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace fp8_quantize
}  // namespace tilesmith

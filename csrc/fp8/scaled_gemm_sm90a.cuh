// FP8 scaled GEMM for Hopper (sm_90a):
// out = act((a * scale_a) @ (b * scale_b) + bias) + residual, act one of gemm's activations.
//
// A 128 x kBlockN output tile per block of two warpgroups (64 rows each), kBlockN = 256
// where n fills it (each tile of a is then reused over twice the columns: half the operand
// traffic per flop of the 128-wide tile), else 128. K advances 128 at a time through a
// cp.async pipeline into shared memory laid out in the 128-byte swizzle that wgmma's matrix
// descriptors read directly; each stage is four wgmma m64n{kBlockN}k32, fp32 accumulators
// in registers. FP8 wgmma takes both operands K-major, so b arrives as b^T (n x k, k
// contiguous: the column-major b torch._scaled_mm also requires).
//
// The wgmma of one K step stays in flight while the next step's copies are waited for and
// issued (common/tiles_sm90a.cuh's run_wgmma_pipeline, which the Hopper matmul runs too).
//
// Scales: per tensor or per row/column, applied once in the epilogue; or per block (1x128 of
// a, 128x128 of b), where each 128-deep K step accumulates into a fresh set of registers
// that is then scaled and added to the total (the "promotion" DeepSeek-V3 describes: it also
// keeps the fp32 sums short, the reason fp8 wgmma's limited accumulation precision needs it).
//
// Two kernels run that: scaled_gemm_kernel, whose producer is every thread (cp.async between
// the wgmma waits), and scaled_gemm_tma_kernel, fed by the TMA from a producer warpgroup,
// persistent, as matmul/matmul_tma_sm90a.cuh (taken wherever the TMA can read a and b^T;
// backend.hopper_kernels(tma=False) runs the former). Both share k_step and store_output.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/stage_ring_sm90a.cuh"
#include "../common/tiles_sm80.cuh"
#include "../common/tiles_sm90a.cuh"
#include "../common/wgmma_sm90a.cuh"
#include "../matmul/epilogue.cuh"  // activate
#include "scaled_gemm.h"

namespace tilesmith {
namespace fp8_sm90a {

constexpr int kBlockM = 128;
constexpr int kBlockK = 128;  // fp8: 128 elements = one 128-byte swizzled row
constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kTileBytesA = kBlockM * kBlockK;  // a's tile of one stage (16 KiB)

// Per tile width: as many stages as fit 227 KiB of shared memory with the 1024 bytes that
// align the start (the swizzle pattern is a function of the address bits 4-9). 128 wide:
// 5 stages of 32 KiB; 256 wide: 4 of 48 KiB.
template <int kBlockN>
struct Tiling {
  static_assert(kBlockN == 128 || kBlockN == 256, "tile widths: 128 and 256");
  static constexpr int kTileBytesB = kBlockN * kBlockK;
  static constexpr int kStages = kBlockN == 128 ? 5 : 4;
  static constexpr int kSmemBytes = kStages * (kTileBytesA + kTileBytesB) + 1024;
};

// The tile width of a call: 256 where n fills it, except with per-block scales (one 128x128
// scale of b per tile, and a second accumulator set that 256 columns would not fit).
inline int tile_width(const ScaledGemmParams& p) {
  return p.scale_a_kind != ScaleKind::kBlock && p.n >= 256 ? 256 : 128;
}

__device__ __forceinline__ float load_value(const void* in, int64_t index, OutDtype dtype) {
  if (dtype == OutDtype::kFloat32) return static_cast<const float*>(in)[index];
  if (dtype == OutDtype::kBFloat16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(in)[index]);
  }
  return __half2float(static_cast<const __half*>(in)[index]);
}

__device__ __forceinline__ void store_pair(void* out, int64_t index, float v0, float v1,
                                           bool has1, OutDtype dtype) {
  if (dtype == OutDtype::kFloat32) {
    float* o = static_cast<float*>(out) + index;
    o[0] = v0;
    if (has1) o[1] = v1;
  } else if (dtype == OutDtype::kBFloat16) {
    __nv_bfloat16* o = static_cast<__nv_bfloat16*>(out) + index;
    o[0] = __float2bfloat16_rn(v0);
    if (has1) o[1] = __float2bfloat16_rn(v1);
  } else {
    __half* o = static_cast<__half*>(out) + index;
    o[0] = __float2half_rn(v0);
    if (has1) o[1] = __float2half_rn(v1);
  }
}

// A block's accumulators: acc, and with per-block scales the partial sums of one K step.
template <int kBlockN, bool kBlockScaled>
struct Accumulators {
  float acc[kBlockN / 2];
  float partial[kBlockScaled ? kBlockN / 2 : 1];
};

// The two output rows of this thread in warpgroup `warpgroup`'s 64 of the tile at block_m0:
// lane / 4 and lane / 4 + 8 of its warp's 16.
__device__ __forceinline__ void thread_rows(int64_t (&rows)[2], int64_t block_m0, int warpgroup) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  rows[0] = block_m0 + warpgroup * 64 + warp * 16 + lane / 4;
  rows[1] = rows[0] + 8;
}

// K step kt on the stage tiles at shared addresses a_tile (this warpgroup's 64 rows of a)
// and b_tile: issues its four wgmma and returns with step kt - 1 retired (one step stays in
// flight); with per-block scales it waits for this step too and adds its partial sums,
// scaled, to the total.
template <typename A, typename B, int kBlockN, bool kBlockScaled>
__device__ __forceinline__ void k_step(Accumulators<kBlockN, kBlockScaled>& d, uint32_t a_tile,
                                       uint32_t b_tile, const ScaledGemmParams& p, int kt,
                                       const int64_t (&rows)[2], int64_t block_n0) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBlockK / 32; ++kk) {
    const uint64_t desc_a = smem_descriptor_sw128(a_tile + kk * 32);
    const uint64_t desc_b = smem_descriptor_sw128(b_tile + kk * 32);
    if constexpr (kBlockScaled) {
      wgmma_m64nk32<kBlockN, A, B>(d.partial, desc_a, desc_b, kk > 0);
    } else {
      wgmma_m64nk32<kBlockN, A, B>(d.acc, desc_a, desc_b, 1);
    }
  }
  wgmma_commit();
  if constexpr (kBlockScaled) {
    wgmma_wait<0>();  // the partial sums are read right away
    fence_registers(d.partial);
    // One 128x128 scale of b covers this whole tile; a's scales are per row.
    const float scale_b = p.scale_b[kt * p.scale_b_row_stride + block_n0 / kBlockN];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float scale = rows[half] < p.m
          ? p.scale_a[rows[half] * p.scale_a_row_stride + kt] * scale_b : 0.0f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        d.acc[4 * j + 2 * half] += d.partial[4 * j + 2 * half] * scale;
        d.acc[4 * j + 2 * half + 1] += d.partial[4 * j + 2 * half + 1] * scale;
      }
    }
  } else {
    wgmma_wait<1>();  // step kt - 1 retired; step kt runs on
  }
}

// The epilogue: per-tensor and per-row/column scales, then the bias (the pre-activation,
// stored where p.pre asks for it), the activation and the residual, then the store of this
// thread's rows of the tile at block_n0.
template <int kBlockN, bool kBlockScaled>
__device__ __forceinline__ void store_output(const float (&acc)[kBlockN / 2],
                                             const ScaledGemmParams& p, const int64_t (&rows)[2],
                                             int64_t block_n0) {
  const int lane = threadIdx.x % 32;
  const float tensor_scale_a = p.scale_a_kind == ScaleKind::kTensor ? p.scale_a[0] : 1.0f;
  const float tensor_scale_b = p.scale_b_kind == ScaleKind::kTensor ? p.scale_b[0] : 1.0f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = rows[half];
    if (row >= p.m) continue;
    float row_scale = kBlockScaled ? 1.0f : tensor_scale_a * tensor_scale_b;
    if (!kBlockScaled && p.scale_a_kind == ScaleKind::kRow) row_scale *= p.scale_a[row];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      const int64_t col = block_n0 + 8 * j + 2 * (lane % 4);
      if (col >= p.n) continue;
      const bool has1 = col + 1 < p.n;
      float v[2] = {acc[4 * j + 2 * half] * row_scale, acc[4 * j + 2 * half + 1] * row_scale};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (e == 1 && !has1) continue;
        if (!kBlockScaled && p.scale_b_kind == ScaleKind::kRow) v[e] *= p.scale_b[col + e];
        if (p.bias != nullptr) v[e] += p.bias[col + e];
      }
      if (p.pre != nullptr) store_pair(p.pre, row * p.n + col, v[0], v[1], has1, p.out_dtype);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (e == 1 && !has1) continue;
        v[e] = activate(v[e], p.activation);
        if (p.residual != nullptr) {
          v[e] += load_value(p.residual, row * p.residual_row_stride + col + e, p.out_dtype);
        }
      }
      store_pair(p.out, row * p.n + col, v[0], v[1], has1, p.out_dtype);
    }
  }
}

template <typename A, typename B, int kBlockN, bool kBlockScaled>
__global__ void __launch_bounds__(kThreads) scaled_gemm_kernel(const ScaledGemmParams p) {
  static_assert(!kBlockScaled || kBlockN == 128, "per-block scales: 128-wide tiles");
  using Tiles = Tiling<kBlockN>;
  constexpr int kStages = Tiles::kStages;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_a = aligned_shared(shared_bytes);
  uint8_t* smem_b = smem_a + kStages * kTileBytesA;

  int64_t block_m0, block_n0;
  grouped_block_tile<kBlockM, kBlockN, 8>(p.m, p.n, blockIdx.x, block_m0, block_n0);
  const uint8_t* a = static_cast<const uint8_t*>(p.a);
  const uint8_t* b = static_cast<const uint8_t*>(p.b);
  auto load_stage = [&](int stage, int k_tile) {
    const int64_t k0 = static_cast<int64_t>(k_tile) * kBlockK;
    load_swizzled_tile<uint8_t, kThreads, kBlockM, 1>(smem_a + stage * kTileBytesA, a, block_m0,
                                                      p.m, k0, p.k, p.a_row_stride);
    load_swizzled_tile<uint8_t, kThreads, kBlockN, 1>(smem_b + stage * Tiles::kTileBytesB, b,
                                                      block_n0, p.n, k0, p.k, p.b_row_stride);
  };

  const int warpgroup = threadIdx.x / 128;
  int64_t rows[2];
  thread_rows(rows, block_m0, warpgroup);
  Accumulators<kBlockN, kBlockScaled> d;
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) d.acc[i] = 0.0f;

  const int k_tiles = static_cast<int>((p.k + kBlockK - 1) / kBlockK);
  run_wgmma_pipeline<kStages>(k_tiles, load_stage, [&](int stage, int kt) {
    k_step<A, B, kBlockN, kBlockScaled>(
        d, shared_address(smem_a + stage * kTileBytesA + warpgroup * 64 * kSwizzleRowBytes),
        shared_address(smem_b + stage * Tiles::kTileBytesB), p, kt, rows, block_n0);
  });
  fence_registers(d.acc);  // read only after the pipeline's last wait
  store_output<kBlockN, kBlockScaled>(d.acc, p, rows, block_n0);
}

// ---- TMA-fed, warp-specialized, persistent (as matmul/matmul_tma_sm90a.cuh) ----------------

// The stage sizes of the ring (a 128-deep K step of fp8 is one 128-byte row).
template <int kBlockN>
using TmaTiling = RingTiling<kBlockN>;
static_assert(TmaTiling<128>::kTileBytesA == kTileBytesA, "the cp.async kernel's stage layout");

// The kernel's one parameter, __grid_constant__ (the TMA reads the tile maps in place).
struct TmaArguments {
  CUtensorMap map_a, map_b;
  ScaledGemmParams params;
};

template <typename A, typename B, int kBlockN, bool kBlockScaled>
__global__ void __launch_bounds__(kRingThreads, 1)
    scaled_gemm_tma_kernel(const __grid_constant__ TmaArguments args) {
  static_assert(!kBlockScaled || kBlockN == 128, "per-block scales: 128-wide tiles");
  using Tiles = TmaTiling<kBlockN>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  RingSharedMemory<kBlockN> smem(shared_bytes);
  auto& ring = smem.ring;

  const ScaledGemmParams& p = args.params;
  const int64_t tiles = ((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  const int k_tiles = static_cast<int>((p.k + kBlockK - 1) / kBlockK);

  if (threadIdx.x < 128) {  // the producer warpgroup; one thread issues
    warpgroup_release_registers<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    prefetch_tile_map(&args.map_a);
    prefetch_tile_map(&args.map_b);
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int64_t block_m0, block_n0;
      grouped_block_tile<kBlockM, kBlockN, 8>(p.m, p.n, static_cast<int>(tile), block_m0,
                                              block_n0);
      for (int kt = 0; kt < k_tiles; ++kt, ring.advance()) {
        uint64_t* landed = ring.acquire(Tiles::kStageBytes);
        const int k0 = kt * kBlockK;
        tma_load_tile(smem.a_stage(ring.stage), &args.map_a, landed, k0,
                      static_cast<int>(block_m0), 0);
        tma_load_tile(smem.b_stage(ring.stage), &args.map_b, landed, k0,
                      static_cast<int>(block_n0), 0);
      }
    }
    return;
  }

  warpgroup_claim_registers<kConsumerRegisters>();
  const int consumer = threadIdx.x / 128 - 1;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int64_t block_m0, block_n0;
    grouped_block_tile<kBlockM, kBlockN, 8>(p.m, p.n, static_cast<int>(tile), block_m0,
                                            block_n0);
    int64_t rows[2];
    thread_rows(rows, block_m0, consumer);
    Accumulators<kBlockN, kBlockScaled> d;
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) d.acc[i] = 0.0f;
    consume_steps(ring, k_tiles, [&](int stage, int kt) {
      k_step<A, B, kBlockN, kBlockScaled>(
          d, shared_address(smem.a_stage(stage) + consumer * 64 * kSwizzleRowBytes),
          shared_address(smem.b_stage(stage)), p, kt, rows, block_n0);
    });
    fence_registers(d.acc);  // read only after the last wait
    store_output<kBlockN, kBlockScaled>(d.acc, p, rows, block_n0);
  }
}

// The tile maps of a and b^T (both K-major: boxes of 128 fp8 of K by the tile's rows);
// false where the TMA cannot read them.
template <int kBlockN>
inline bool describe_operands(const ScaledGemmParams& p, TmaArguments& args) {
  args.params = p;
  return encode_tile_map(&args.map_a, TileMapShape{p.a, 1, p.k, p.m, 1, p.a_row_stride, 0,
                                                   kBlockM}) &&
         encode_tile_map(&args.map_b, TileMapShape{p.b, 1, p.k, p.n, 1, p.b_row_stride, 0,
                                                   kBlockN});
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename A, typename B, int kBlockN, bool kBlockScaled>
cudaError_t launch(const ScaledGemmParams& p, cudaStream_t stream) {
  constexpr int kSmemBytes = Tiling<kBlockN>::kSmemBytes;
  auto kernel = scaled_gemm_kernel<A, B, kBlockN, kBlockScaled>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = ((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  kernel<<<static_cast<unsigned>(tiles), kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// The TMA kernel, one block per SM (at most one per tile); false where the TMA cannot read
// the operands (launching nothing).
template <typename A, typename B, int kBlockN, bool kBlockScaled>
bool launch_tma(const ScaledGemmParams& p, cudaStream_t stream, cudaError_t* error) {
  TmaArguments args;
  if (!describe_operands<kBlockN>(p, args)) return false;
  constexpr int kSmemBytes = TmaTiling<kBlockN>::kSmemBytes;
  auto kernel = scaled_gemm_tma_kernel<A, B, kBlockN, kBlockScaled>;
  *error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  int device = 0, sms = 0;
  if (*error == cudaSuccess) *error = cudaGetDevice(&device);
  if (*error == cudaSuccess) {
    *error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (*error != cudaSuccess) return true;
  const int64_t tiles = ((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  kernel<<<static_cast<unsigned>(tiles < sms ? tiles : sms), kRingThreads, kSmemBytes, stream>>>(
      args);
  *error = cudaGetLastError();
  return true;
}

// The TMA kernel where `tma` and the TMA can read the operands, else the cp.async one.
template <typename A, typename B, int kBlockN, bool kBlockScaled>
cudaError_t run_variant(const ScaledGemmParams& p, bool tma, cudaStream_t stream) {
  cudaError_t error = cudaSuccess;
  if (tma && launch_tma<A, B, kBlockN, kBlockScaled>(p, stream, &error)) return error;
  return launch<A, B, kBlockN, kBlockScaled>(p, stream);
}

template <typename A, typename B>
cudaError_t run(const ScaledGemmParams& p, bool tma, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (p.scale_a_kind == ScaleKind::kBlock) return run_variant<A, B, 128, true>(p, tma, stream);
  return tile_width(p) == 256 ? run_variant<A, B, 256, false>(p, tma, stream)
                              : run_variant<A, B, 128, false>(p, tma, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace fp8_sm90a
}  // namespace tilesmith

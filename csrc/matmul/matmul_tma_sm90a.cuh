// The Hopper matmul with TMA loads and warp specialization: matmul_sm90a.cuh's tiles, wgmma
// steps and epilogue, fed the way Hopper is built to be fed. Three warpgroups a block:
//   - a producer: one thread asks the TMA (common/tma_sm90a.cuh) for each K step's tiles of a
//     and b, into a ring of shared-memory stages, as soon as the consumers free a stage. It
//     gives most of its registers back (setmaxnreg) to
//   - two consumers, 64 output rows each: wait for a stage to land, issue its four wgmma,
//     free the stage of the step before once that step's wgmma retired (one step stays in
//     flight), then write their rows through the fused epilogue from registers.
// The stages and their two mbarriers each are common/stage_ring_sm90a.cuh's StageRing. No
// thread of the consumers computes an address or waits at a block-wide barrier in the K
// loop.
//
// Persistent: a block per SM walks the output tiles blockIdx.x, + gridDim.x, ... (grouped
// as the cp.async kernel orders them), and the producer runs ahead into the next tile's K
// steps while the consumers store this one's, so loads overlap the epilogue.
//
// The TMA reads an operand when its base is 16-byte aligned and its strides (other than
// the unit one) are multiples of 16 bytes; run() takes the cp.async kernel where a tile map
// cannot be made, and for calls hopper_kernels(..., tma=False) routes there.
#pragma once

#include "../common/stage_ring_sm90a.cuh"
#include "matmul_sm90a.cuh"

namespace tilesmith {
namespace matmul_tma_sm90a {

using matmul_sm90a::kBlockK;
using matmul_sm90a::kBlockM;
using matmul_sm90a::kGroupM;
using matmul_sm90a::kTileBytesA;

// The stage sizes of the ring (a 64-deep K step of 16-bit elements is one 128-byte row).
template <int kBlockN>
using Tiling = RingTiling<kBlockN>;
static_assert(Tiling<128>::kTileBytesA == kTileBytesA, "the cp.async kernel's stage layout");

// The kernel's one parameter, __grid_constant__: the tile maps must stay in parameter
// space for the TMA to read them there.
struct Arguments {
  CUtensorMap map_a, map_b;
  MatmulParams params;
  bool a_batched, b_batched;  // false: one matrix read for every batch entry (stride 0)
};

// Which tile of the batch of products a block handles at step `tile` of its walk.
struct TilePlace {
  int64_t z, m0, n0;
};
template <int kBlockN>
__device__ __forceinline__ TilePlace place_tile(const MatmulParams& p, int64_t tile,
                                                int64_t tiles_per_matrix) {
  TilePlace place;
  place.z = tile / tiles_per_matrix;
  const int within = static_cast<int>(tile % tiles_per_matrix);
  grouped_block_tile<kBlockM, kBlockN, kGroupM>(p.m, p.n, within, place.m0, place.n0);
  return place;
}

template <typename T, typename OutT, int kBlockN, bool kMnMajorA, bool kMnMajorB>
__global__ void __launch_bounds__(kRingThreads, 1)
    matmul_tma_kernel(const __grid_constant__ Arguments args) {
  using Tiles = Tiling<kBlockN>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  RingSharedMemory<kBlockN> smem(shared_bytes);
  auto& ring = smem.ring;

  const MatmulParams& p = args.params;
  const int64_t tiles_per_matrix =
      ((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  const int64_t tiles = tiles_per_matrix * p.batch;
  const int k_tiles = static_cast<int>((p.k + kBlockK - 1) / kBlockK);

  if (threadIdx.x < 128) {  // the producer warpgroup; one thread issues
    warpgroup_release_registers<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    prefetch_tile_map(&args.map_a);
    prefetch_tile_map(&args.map_b);
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const TilePlace at = place_tile<kBlockN>(p, tile, tiles_per_matrix);
      const int za = args.a_batched ? static_cast<int>(at.z) : 0;
      const int zb = args.b_batched ? static_cast<int>(at.z) : 0;
      const int m0 = static_cast<int>(at.m0), n0 = static_cast<int>(at.n0);
      for (int kt = 0; kt < k_tiles; ++kt, ring.advance()) {
        uint64_t* landed = ring.acquire(Tiles::kStageBytes);  // whole boxes, zero-filled too
        uint8_t* sa = smem.a_stage(ring.stage);
        uint8_t* sb = smem.b_stage(ring.stage);
        const int k0 = kt * kBlockK;
        // Boxes of 64 elements x rows: the stage layouts of matmul_sm90a.cuh.
        constexpr int kMnBlockBytes = kBlockK * kSwizzleRowBytes;
        if constexpr (kMnMajorA) {
          for (int j = 0; j < kBlockM / 64; ++j) {
            tma_load_tile(sa + j * kMnBlockBytes, &args.map_a, landed, m0 + 64 * j, k0, za);
          }
        } else {
          tma_load_tile(sa, &args.map_a, landed, k0, m0, za);
        }
        if constexpr (kMnMajorB) {
          for (int j = 0; j < kBlockN / 64; ++j) {
            tma_load_tile(sb + j * kMnBlockBytes, &args.map_b, landed, n0 + 64 * j, k0, zb);
          }
        } else {
          tma_load_tile(sb, &args.map_b, landed, k0, n0, zb);
        }
      }
    }
    return;
  }

  warpgroup_claim_registers<kConsumerRegisters>();
  const int consumer = threadIdx.x / 128 - 1;
  const uint32_t a_offset = matmul_sm90a::warpgroup_rows_offset(consumer);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TilePlace at = place_tile<kBlockN>(p, tile, tiles_per_matrix);
    float acc[kBlockN / 2];
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) acc[i] = 0.0f;
    consume_steps(ring, k_tiles, [&](int stage, int) {
      matmul_sm90a::issue_step<T, kBlockN, kMnMajorA, kMnMajorB>(
          acc, shared_address(smem.a_stage(stage)) + a_offset, shared_address(smem.b_stage(stage)));
      wgmma_wait<1>();  // step kt - 1 retired: consume_steps frees its stage
    });
    fence_registers(acc);  // read only after the last wait
    matmul_sm90a::store_tile<kBlockN>(acc, EpilogueWriter<T, OutT>(p, at.z), at.m0, at.n0,
                                      consumer);
  }
}

// The tile maps of a and b for a kBlockN-wide tile, in the layouts matmul_sm90a.cuh reads
// (mn_major_a / mn_major_b). False where the TMA cannot read an operand.
template <int kBlockN>
inline bool describe_operands(const MatmulParams& p, Arguments& args) {
  TileMapShape a{p.a, 2, 0, 0, p.batch, 0, p.a_batch_stride, 0};
  if (matmul_sm90a::mn_major_a(p)) {  // rows of k, unit stride along m
    if (p.a_row_stride != 1) return false;
    a.inner = p.m, a.outer = p.k, a.outer_stride = p.a_col_stride, a.box_outer = kBlockK;
  } else {
    a.inner = p.k, a.outer = p.m, a.outer_stride = p.a_row_stride, a.box_outer = kBlockM;
  }
  TileMapShape b{p.b, 2, 0, 0, p.batch, 0, p.b_batch_stride, 0};
  if (matmul_sm90a::mn_major_b(p)) {  // rows of k, unit stride along n
    b.inner = p.n, b.outer = p.k, b.outer_stride = p.b_row_stride, b.box_outer = kBlockK;
  } else {
    if (p.b_row_stride != 1) return false;
    b.inner = p.k, b.outer = p.n, b.outer_stride = p.b_col_stride, b.box_outer = kBlockN;
  }
  args.params = p;
  args.a_batched = p.batch > 1 && p.a_batch_stride != 0;
  args.b_batched = p.batch > 1 && p.b_batch_stride != 0;
  return encode_tile_map(&args.map_a, a) && encode_tile_map(&args.map_b, b);
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, typename OutT, int kBlockN, bool kMnMajorA, bool kMnMajorB>
cudaError_t launch(const Arguments& args, cudaStream_t stream) {
  const auto kernel = matmul_tma_kernel<T, OutT, kBlockN, kMnMajorA, kMnMajorB>;
  constexpr int kSmemBytes = Tiling<kBlockN>::kSmemBytes;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const MatmulParams& p = args.params;
  const int64_t tiles =
      ((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN) * p.batch;
  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(tiles < sms ? tiles : sms);
  kernel<<<blocks, kRingThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, typename OutT, int kBlockN>
bool try_width(const MatmulParams& p, cudaStream_t stream, cudaError_t* error) {
  Arguments args;
  if (!describe_operands<kBlockN>(p, args)) return false;
  using matmul_sm90a::mn_major_a;
  using matmul_sm90a::mn_major_b;
  if (mn_major_a(p)) {
    *error = mn_major_b(p) ? launch<T, OutT, kBlockN, true, true>(args, stream)
                           : launch<T, OutT, kBlockN, true, false>(args, stream);
  } else {
    *error = mn_major_b(p) ? launch<T, OutT, kBlockN, false, true>(args, stream)
                           : launch<T, OutT, kBlockN, false, false>(args, stream);
  }
  return true;
}

// The TMA kernel where `tma` and the TMA can read the operands, else matmul_sm90a.cuh's
// cp.async kernel (for calls matmul_sm90a::takes).
template <typename T, typename OutT>
cudaError_t run(const MatmulParams& p, bool tma, cudaStream_t stream) {
  if (p.batch == 0 || p.m == 0 || p.n == 0) return cudaSuccess;
  cudaError_t error = cudaSuccess;
  if (tma) {
    const bool taken = matmul_sm90a::tile_width(p) == 256
                           ? try_width<T, OutT, 256>(p, stream, &error)
                           : try_width<T, OutT, 128>(p, stream, &error);
    if (taken) return error;
  }
  return matmul_sm90a::run<T, OutT>(p, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace matmul_tma_sm90a
}  // namespace tilesmith

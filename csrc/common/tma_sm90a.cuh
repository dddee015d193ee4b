// The Tensor Memory Accelerator (TMA) and the shared-memory barriers (mbarrier) it signals:
// the load path of the warp-specialized Hopper kernels (stage_ring_sm90a.cuh). One
// thread asks the TMA for a whole tile (cp.async.bulk.tensor); the copy engine fetches it,
// writes it into shared memory in the 128-byte swizzle that wgmma's descriptors read
// (tiles_sm90a.cuh: the same layout load_swizzled_tile writes), zero-fills what lies
// outside the matrix, and counts its bytes on an mbarrier that the consumers wait on. No
// thread spends registers or issue slots on addresses, which is what the cp.async kernels
// pay for.
//
// A tile map (CUtensorMap, 128 bytes) describes the matrix to the TMA: encoded on the host
// per call (encode_tile_map) and passed to the kernel as a __grid_constant__ parameter.
// Under TILESMITH_CPU_EMULATION the device side comes from tests/emulation/sm90a_emulator.h.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums only: the driver is reached at run time
#include <cuda_runtime.h>

#include <cstdint>

#include "mma_sm80.cuh"  // shared_address

namespace tilesmith {

// A batch of `batches` matrices of 1- or 2-byte elements, `outer` rows of `inner` elements
// each (unit stride along inner), read in boxes of `box_outer` rows x 128 bytes: one
// swizzled 128-byte row of shared memory per matrix row. Strides in elements; a batch
// stride of 0 (a broadcast operand) reads matrix 0 for every batch entry. Maps of rank 4
// (encode_tile_map_4d) have `groups` such batches, `group_stride` apart (0: broadcast too).
struct TileMapShape {
  const void* base;
  int element_bytes;
  int64_t inner, outer, batches;
  int64_t outer_stride, batch_stride;
  int box_outer;
  int64_t groups = 1, group_stride = 0;
};

// Whether the TMA can read `shape` at all (the tile map's rules: a 16-byte aligned base,
// strides that are multiples of 16 bytes, coordinates that fit in int32).
inline bool tile_map_fits(const TileMapShape& s) {
  const int64_t kMaxCoordinate = (int64_t{1} << 31) - 512;
  return reinterpret_cast<uintptr_t>(s.base) % 16 == 0 &&
         (s.outer_stride * s.element_bytes) % 16 == 0 &&
         (s.batch_stride * s.element_bytes) % 16 == 0 &&
         (s.group_stride * s.element_bytes) % 16 == 0 && s.inner > 0 && s.outer > 0 &&
         s.batches > 0 && s.groups > 0 && s.inner < kMaxCoordinate &&
         s.outer < kMaxCoordinate && s.batches < kMaxCoordinate && s.groups < kMaxCoordinate &&
         s.box_outer > 0 && s.box_outer <= 256;
}

// Whether a map's batch (and group) coordinate selects a matrix: false where there is one,
// or the stride is 0, and the kernel then reads coordinate 0.
inline bool tile_map_batched(const TileMapShape& s) {
  return s.batches > 1 && s.batch_stride != 0;
}
inline bool tile_map_grouped(const TileMapShape& s) {
  return s.groups > 1 && s.group_stride != 0;
}

#ifndef TILESMITH_CPU_EMULATION

// cuTensorMapEncodeTiled from the driver, found through the runtime so that the extension
// does not link libcuda itself; nullptr where the driver lacks it.
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* symbol = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion(
        "cuTensorMapEncodeTiled", &symbol, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &symbol, cudaEnableDefault, &found);
#endif
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<EncodeTiledFn>(symbol)
               : nullptr;
  }();
  return fn;
}

// Encodes `shape` as a tile map of rank 3 (inner, outer, batch) or 4 (..., group) in the
// 128-byte swizzle, out-of-range elements read as zero. Returns false (map unusable) where
// the TMA cannot read it or the driver refuses it; the caller then takes its cp.async
// kernel.
inline bool encode_tile_map_rank(CUtensorMap* map, const TileMapShape& s, int rank) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr || !tile_map_fits(s)) return false;
  const bool batched = tile_map_batched(s), grouped = tile_map_grouped(s);
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(s.inner), static_cast<cuuint64_t>(s.outer),
                              static_cast<cuuint64_t>(batched ? s.batches : 1),
                              static_cast<cuuint64_t>(grouped ? s.groups : 1)};
  // A dimension of extent 1 still needs a stride: that of a packed layout.
  const int64_t outer_bytes = s.outer_stride * s.element_bytes;
  const int64_t batch_bytes = batched ? s.batch_stride * s.element_bytes : outer_bytes * s.outer;
  const int64_t group_bytes = grouped ? s.group_stride * s.element_bytes
                                      : batch_bytes * static_cast<int64_t>(dims[2]);
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(outer_bytes),
                                 static_cast<cuuint64_t>(batch_bytes),
                                 static_cast<cuuint64_t>(group_bytes)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(128 / s.element_bytes),
                             static_cast<cuuint32_t>(s.box_outer), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  return encode(map, s.element_bytes == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                          : CU_TENSOR_MAP_DATA_TYPE_UINT16,
                rank, const_cast<void*>(s.base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
inline bool encode_tile_map(CUtensorMap* map, const TileMapShape& s) {
  return s.groups == 1 && encode_tile_map_rank(map, s, 3);
}
inline bool encode_tile_map_4d(CUtensorMap* map, const TileMapShape& s) {
  return encode_tile_map_rank(map, s, 4);
}

// ---- device side ---------------------------------------------------------------------------

// An mbarrier completes a phase when `count` arrivals and every byte it was told to expect
// (arrive_expect_tx) have come; waiters name the phase by its parity.
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)),
               "r"(count)
               : "memory");
}
// Makes the initialised barriers visible to the other threads and to the TMA (the async
// proxy); a __syncthreads must follow before anyone uses them.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
                   shared_address(barrier))
               : "memory");
}
// One arrival that also announces `bytes` still to land (the TMA's copies count them off).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
          shared_address(barrier)),
      "r"(bytes)
      : "memory");
}
// The slow path of mbarrier_wait, called after each miss: the first returns the time of
// the miss, a later one 10 s after it traps. Out of line on purpose: inlined into the wait
// loop, its timer read and trap made ptxas spill (and serialise wgmma) in consumer
// warpgroups that need most of their registers, as the attention forward's do.
static __device__ __noinline__ uint64_t trap_if_deadlocked(uint64_t first_miss) {
  constexpr uint64_t kDeadlockNanoseconds = 10'000'000'000ull;
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(now));
  if (first_miss == 0) return now;
  if (now - first_miss > kDeadlockNanoseconds) __trap();
  return first_miss;
}

// Waits until the phase of parity `parity` has completed (a fresh barrier counts the phase
// before its first, parity 1, as completed). try_wait suspends the thread for a while in
// hardware before it answers false. A phase still open 10 s after the first false answer
// is a deadlock (every legitimate wait here is microseconds): it traps, so that a broken
// kernel ends in a launch error instead of a hung process.
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  const uint32_t address = shared_address(barrier);
  uint64_t first_miss = 0;
  for (;;) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
    if (done) return;
    first_miss = trap_if_deadlocked(first_miss);
  }
}

// The box of `map` at element (inner, outer, batch) into shared memory at `dst` (1024-byte
// aligned: the swizzle is a function of address bits 4-9), its bytes counted on `barrier`.
__device__ __forceinline__ void tma_load_tile(void* dst, const CUtensorMap* map,
                                              uint64_t* barrier, int inner, int outer,
                                              int batch) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(barrier)), "r"(inner), "r"(outer),
      "r"(batch)
      : "memory");
}
// The same from a rank-4 map, at element (inner, outer, batch, group).
__device__ __forceinline__ void tma_load_tile_4d(void* dst, const CUtensorMap* map,
                                                 uint64_t* barrier, int inner, int outer,
                                                 int batch, int group) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(barrier)), "r"(inner), "r"(outer),
      "r"(batch), "r"(group)
      : "memory");
}
// Fetches the tile map into the TMA's cache ahead of the first load.
__device__ __forceinline__ void prefetch_tile_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Warpgroup register reallocation: the producer warpgroup gives registers back, the
// consumers take them (every thread of the warpgroup executes it).
template <int kRegisters>
__device__ __forceinline__ void warpgroup_release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void warpgroup_claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Named barriers between warps (ids 1-15; __syncthreads owns 0): a phase completes when
// kThreads threads (whole warps) have reached it; those that sync wait for it, those that
// arrive go on. The attention forward's consumer warpgroups take turns with them. Ids are
// immediates so that ptxas reserves only the barriers used (a register id reserves all 16).
template <int kId, int kThreads>
__device__ __forceinline__ void named_barrier_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory");
}
template <int kId, int kThreads>
__device__ __forceinline__ void named_barrier_arrive() {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory");
}

#endif  // TILESMITH_CPU_EMULATION

}  // namespace tilesmith

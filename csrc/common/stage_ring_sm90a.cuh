// The ring of shared-memory stages between a TMA producer thread and wgmma consumer
// warpgroups, the skeleton of the warp-specialized Hopper kernels (matmul_tma_sm90a.cuh,
// fp8/scaled_gemm_sm90a.cuh, attention/attention_fwd_tma_sm90a.cuh: one ring for K, one
// for V). Each stage has two mbarriers (tma_sm90a.cuh): `full`
// completes when the producer's arrival and the stage's bytes have come, `empty` when every
// consumer warp has freed the stage. Producer and consumers each keep a StageRing and walk
// the same sequence of (stage, phase) in the same order of K steps, across all the tiles a
// persistent block handles.
#pragma once

#include <cstdint>

#include "tiles_sm90a.cuh"  // aligned_shared
#include "tma_sm90a.cuh"
#include "wgmma_sm90a.cuh"

namespace tilesmith {

// The block these kernels use: a producer warpgroup and two consumer warpgroups of 64 output
// rows each. setmaxnreg moves registers from the producer to the consumers: 40 + 2 x 232 a
// thread fill the SM's 64 Ki exactly as the 168 of the launch (384 x 168) do. ptxas honours
// it only where the two roles' code never merges again: the producer's branch must end in
// a return (a role-returning helper whose callers re-converge made ptxas drop both
// setmaxnreg, silently; tests/test_build.py counts them in the SASS).
constexpr int kRingConsumers = 2;
constexpr int kRingThreads = (kRingConsumers + 1) * 128;
constexpr int kRingConsumerWarps = kRingConsumers * 4;
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;

// Their ring for a 128 x kBlockN output tile whose K step is one swizzled 128-byte row deep
// (64 bf16/fp16 or 128 fp8): a stage holds a 16 KiB tile of a and a kBlockN-row one of b; as
// many stages as fit 227 KiB with the 1024 bytes of alignment slack and two 8-byte mbarriers
// a stage: 7 of 32 KiB at 128 wide, 4 of 48 KiB at 256.
template <int kBlockN>
struct RingTiling {
  static_assert(kBlockN == 128 || kBlockN == 256, "tile widths: 128 and 256");
  static constexpr int kTileBytesA = 128 * 128;
  static constexpr int kTileBytesB = kBlockN * 128;
  static constexpr int kStageBytes = kTileBytesA + kTileBytesB;
  static constexpr int kStages = kBlockN == 128 ? 7 : 4;
  static constexpr int kSmemBytes = kStages * (kStageBytes + 2 * 8) + 1024;
};

template <int kStages>
struct StageRing {
  uint64_t* full;   // kStages barriers
  uint64_t* empty;  // kStages barriers
  int stage = 0;
  uint32_t phase = 0;

  __device__ __forceinline__ explicit StageRing(uint64_t* barriers)
      : full(barriers), empty(barriers + kStages) {}

  // Thread 0, before the __syncthreads that publishes the barriers to every thread.
  __device__ __forceinline__ void init(int consumer_warps) const {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], consumer_warps);
    }
    fence_barrier_init();
  }

  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }

  // Producer: waits until the consumers freed the current stage (at once on the first lap:
  // a fresh barrier counts its phase "-1" as complete), announces the `bytes` the TMA loads
  // will bring and returns the barrier those loads count them on.
  __device__ __forceinline__ uint64_t* acquire(uint32_t bytes) const {
    mbarrier_wait(&empty[stage], phase ^ 1);
    mbarrier_arrive_expect_tx(&full[stage], bytes);
    return &full[stage];
  }

  // Consumer: waits until the current stage has landed.
  __device__ __forceinline__ void wait_full() const { mbarrier_wait(&full[stage], phase); }

  // Consumer: frees stage `s`, one arrival per warp after every lane got there (each lane's
  // wgmma wait is behind it, so the stage's wgmma have retired).
  __device__ __forceinline__ void release(int s) const {
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty[s]);
  }
};

// A block's shared memory for the ring: kStages tiles of a, then kStages of b, then the
// barriers (1024-byte aligned from the dynamic shared memory's start). Made by every thread;
// thread 0 initialises the barriers and a __syncthreads publishes them.
template <int kBlockN>
struct RingSharedMemory {
  using Tiles = RingTiling<kBlockN>;
  uint8_t* a;
  uint8_t* b;
  StageRing<Tiles::kStages> ring;

  __device__ __forceinline__ explicit RingSharedMemory(unsigned char* shared_bytes)
      : a(aligned_shared(shared_bytes)),
        b(a + Tiles::kStages * Tiles::kTileBytesA),
        ring(reinterpret_cast<uint64_t*>(b + Tiles::kStages * Tiles::kTileBytesB)) {
    if (threadIdx.x == 0) ring.init(kRingConsumerWarps);
    __syncthreads();
  }
  __device__ __forceinline__ uint8_t* a_stage(int stage) const {
    return a + stage * Tiles::kTileBytesA;
  }
  __device__ __forceinline__ uint8_t* b_stage(int stage) const {
    return b + stage * Tiles::kTileBytesB;
  }
};

// A consumer's k_steps K steps of one tile: waits for each stage to land and runs
// step(stage, kt), which issues the step's wgmma and returns with at most one wgmma group in
// flight (wgmma_wait<1>, or <0>); a stage is freed once the step after it has returned, so
// its wgmma have retired. Returns with every wgmma retired and every stage freed.
template <int kStages, typename Step>
__device__ __forceinline__ void consume_steps(StageRing<kStages>& ring, int k_steps,
                                              Step&& step) {
  int previous = -1;
  for (int kt = 0; kt < k_steps; ++kt, ring.advance()) {
    ring.wait_full();
    step(ring.stage, kt);
    if (previous >= 0) ring.release(previous);
    previous = ring.stage;
  }
  wgmma_wait<0>();
  if (previous >= 0) ring.release(previous);
}

}  // namespace tilesmith

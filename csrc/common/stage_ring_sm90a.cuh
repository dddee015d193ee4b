// The ring of shared-memory stages between a TMA producer thread and wgmma consumer
// warpgroups, the skeleton of the warp-specialized Hopper kernels (matmul_tma_sm90a.cuh,
// fp8/scaled_gemm_sm90a.cuh). Each stage has two mbarriers (tma_sm90a.cuh): `full`
// completes when the producer's arrival and the stage's bytes have come, `empty` when every
// consumer warp has freed the stage. Producer and consumers each keep a StageRing and walk
// the same sequence of (stage, phase) in the same order of K steps, across all the tiles a
// persistent block handles.
#pragma once

#include <cstdint>

#include "tma_sm90a.cuh"
#include "wgmma_sm90a.cuh"

namespace tilesmith {

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

// The Hopper attention forward fed by the TMA: attention_fwd_sm90a.cuh's schedule (the
// same ForwardRows: S = Q K^T on wgmma, the softmax of S under the previous block's P V, P
// from registers), with the loads taken off the warpgroups that compute. Three warpgroups a
// block, as the warp-specialized GEMMs (common/stage_ring_sm90a.cuh):
//   - a producer: one thread asks the TMA (common/tma_sm90a.cuh) for the block's Q tile,
//     then for each key block's K and V tiles into two rings of stages, as soon as the
//     consumers free a stage; it gives most of its registers back (setmaxnreg) to
//   - two consumers, 64 query rows each, which wait on a K stage's mbarrier, issue S, then
//     wait on the previous block's V stage and issue its P V. A K stage is freed as soon as
//     its S retired, a V stage when its P V did, so each tensor's loads run as far ahead as
//     its own stages allow. No consumer thread computes an address or waits at a block-wide
//     barrier in the key loop.
// The tiles are those of the cp.async kernel (128 rows by the head dim, kHeadDim / 64
// swizzled column blocks), each column block one TMA box of 64 elements x 128 rows; rows past
// the tensor and columns past the head dim arrive zero-filled. In a packed batch a tile's
// rows past its sequence are the next sequence's: their keys are masked as past the
// sequence's end (their probabilities exactly 0), and their query rows are not stored.
//
// The two consumers take turns at the tensor cores (FlashAttention-3's ping-pong, Turns
// below): one issues its step's products only once the other's S has retired, so that the
// tensor cores run one warpgroup's S and P V while the other computes its softmax.
//
// Takes calls with neither a mask nor dropout (takes_tma), dense or packed, whose tensors
// the TMA can read (rank-4 tile maps: head dim, seq, head, batch; any layout whose strides
// are multiples of 8 elements); run() sends the rest, and every call
// hopper_kernels(tma=False) routes, to the cp.async kernel. Not persistent: one block per
// 128 query rows, as there.
#pragma once

#include "../common/stage_ring_sm90a.cuh"
#include "attention_fwd_sm90a.cuh"

namespace tilesmith {
namespace attention_tma_sm90a {

using attention_sm90a::kBlockM;
using attention_sm90a::kBlockN;
using attention_sm90a::kTileBytes;
using attention_sm90a::kTileRows;

// Stages of K and of V: Q, three of each and their barriers fill 225 KiB at head dim 128.
constexpr int kStages = 3;
// Q's barrier, then each ring's full and empty barriers.
constexpr int kBarriers = 1 + 2 * 2 * kStages;
template <int kHeadDim>
constexpr int kSmemBytes = (1 + 2 * kStages) * kTileBytes<kHeadDim> + kBarriers * 8 + 1024;
static_assert(kSmemBytes<128> <= 227 * 1024, "more than an sm_90 block may have");

// Which of a tile map's coordinates select a matrix: (head, batch) of a rank-4 map (head
// dim, seq, head, batch); false where the tensor has one (or broadcasts it: stride 0),
// read at coordinate 0.
struct HeadBatchCoordinates {
  bool per_head, per_batch;
  __device__ __forceinline__ int head(int64_t h) const {
    return per_head ? static_cast<int>(h) : 0;
  }
  __device__ __forceinline__ int batch(int64_t b) const {
    return per_batch ? static_cast<int>(b) : 0;
  }
};

// The consumers' turns at issuing a step's products. Named barrier 1 + w is warpgroup w's
// turn: w syncs on it before it issues its S and P V, and the other warpgroup arrives on it
// once its own S has retired (its P V still queued on the tensor cores, so they do not
// idle). Arriving between the issue and that wait instead makes ptxas serialise the wgmmas
// (C7514, nvcc 13.0). The second consumer gives the first its first turn before the loop
// and skips its arrival after the last step, so both barriers see as many arrivals as syncs
// (every phase completes; the emulator checks that none is left part-way at exit).
struct Turns {
  static constexpr int kThreads = 2 * 128;  // both consumer warpgroups take part in each phase
  int consumer;
  int steps;  // key blocks: the same for both consumers
  __device__ __forceinline__ void begin() const {
    if (consumer == 1 && steps > 0) named_barrier_arrive<1, kThreads>();
  }
  __device__ __forceinline__ void wait_mine() const {
    if (consumer == 0) {
      named_barrier_sync<1, kThreads>();
    } else {
      named_barrier_sync<2, kThreads>();
    }
  }
  // Once step j's S has retired.
  __device__ __forceinline__ void pass(int j) const {
    if (consumer == 0) {
      named_barrier_arrive<2, kThreads>();
    } else if (j + 1 < steps) {
      named_barrier_arrive<1, kThreads>();
    }
  }
};

// The kernel's one parameter, __grid_constant__ (the tile maps are read in parameter space).
struct Arguments {
  CUtensorMap map_q, map_k, map_v;
  AttentionParams params;
  HeadBatchCoordinates q_at, k_at, v_at;
};

template <typename T, int kHeadDim, bool kCausal>
__global__ void __launch_bounds__(kRingThreads, 1)
    attention_fwd_tma_kernel(const __grid_constant__ Arguments args) {
  constexpr int kTile = kTileBytes<kHeadDim>;
  const AttentionParams& p = args.params;
  const int64_t row0 = attention_sm80::query_block<kBlockM>(kCausal);
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const attention_sm80::Sequence seq = attention_sm80::sequence(p, b, h);
  if (row0 >= seq.seqlen_q) return;  // packed batches launch for the longest sequence
  const int key_blocks = attention_sm90a::key_blocks_for<kCausal>(row0, seq.seqlen_k);

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_q = aligned_shared(shared_bytes);
  uint8_t* smem_k = smem_q + kTile;
  uint8_t* smem_v = smem_k + kStages * kTile;
  uint64_t* q_landed = reinterpret_cast<uint64_t*>(smem_v + kStages * kTile);
  StageRing<kStages> k_ring(q_landed + 1);
  StageRing<kStages> v_ring(q_landed + 1 + 2 * kStages);
  if (threadIdx.x == 0) {
    mbarrier_init(q_landed, 1);
    k_ring.init(kRingConsumerWarps);
    v_ring.init(kRingConsumerWarps);
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // the producer warpgroup; one thread issues
    warpgroup_release_registers<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    prefetch_tile_map(&args.map_q);
    prefetch_tile_map(&args.map_k);
    prefetch_tile_map(&args.map_v);
    const int64_t h_kv = h / (p.heads / p.heads_kv);
    // Column block c of a tile: head-dim columns 64 c .. 64 c + 63 of 128 rows from `row`
    // of head `head`, batch entry `batch`.
    auto load_tile = [&](uint8_t* tile, const CUtensorMap* map, uint64_t* landed, int64_t row,
                         int head, int batch) {
      for (int c = 0; c < kHeadDim / 64; ++c) {
        tma_load_tile_4d(tile + c * kTileRows * kSwizzleRowBytes, map, landed, 64 * c,
                         static_cast<int>(row), head, batch);
      }
    };
    mbarrier_arrive_expect_tx(q_landed, kTile);  // whole boxes, zero-filled ones too
    load_tile(smem_q, &args.map_q, q_landed, seq.q_start + row0, args.q_at.head(h),
              args.q_at.batch(b));
    for (int j = 0; j < key_blocks; ++j) {
      const int64_t key0 = seq.k_start + static_cast<int64_t>(j) * kBlockN;
      load_tile(smem_k + k_ring.stage * kTile, &args.map_k, k_ring.acquire(kTile), key0,
                args.k_at.head(h_kv), args.k_at.batch(b));
      k_ring.advance();
      load_tile(smem_v + v_ring.stage * kTile, &args.map_v, v_ring.acquire(kTile), key0,
                args.v_at.head(h_kv), args.v_at.batch(b));
      v_ring.advance();
    }
    return;
  }

  warpgroup_claim_registers<kConsumerRegisters>();
  const int consumer = threadIdx.x / 128 - 1;
  attention_sm90a::ForwardRows<T, kHeadDim, kCausal, false, false> mine(p, b, h, seq, row0,
                                                                         consumer);
  // This warpgroup's 64 rows of Q: 64 rows into each column block.
  const uint32_t q_tile = shared_address(smem_q) + consumer * 64 * kSwizzleRowBytes;
  auto v_tile = [&] { return shared_address(smem_v + v_ring.stage * kTile); };
  const Turns turns{consumer, key_blocks};
  turns.begin();
  mbarrier_wait(q_landed, 0);
  for (int j = 0; j < key_blocks; ++j) {
    k_ring.wait_full();
    const int k_stage = k_ring.stage;
    turns.wait_mine();
    mine.step(
        q_tile, shared_address(smem_k + k_stage * kTile), static_cast<int64_t>(j) * kBlockN,
        [&] {  // V of block j - 1: the V ring's current stage
          if (j == 0) return false;
          v_ring.wait_full();
          mine.issue_pv(v_tile());
          return true;
        },
        [&] {
          turns.pass(j);
          k_ring.release(k_stage);
          k_ring.advance();
        },
        [&] {
          if (j == 0) return;
          v_ring.release(v_ring.stage);
          v_ring.advance();
        });
  }
  if (key_blocks > 0) {
    v_ring.wait_full();
    mine.finish(v_tile());
    v_ring.release(v_ring.stage);
  }
  mine.store(seq);
}

// Whether the TMA kernel may take the call: no mask, no dropout (head dims as
// attention_sm90a::takes). describe_operands() then says whether the tile maps can be made.
inline bool takes_tma(const AttentionParams& p) {
  return attention_sm90a::takes(p) && p.mask_kind == MaskKind::kNone &&
         p.dropout_seed == nullptr;
}

// The rank-4 tile map (head dim, seq, head, batch) of a (batch, heads, seq, head_dim)
// tensor, any strides the TMA can read (a 16-byte aligned base, the others multiples of 8
// elements); false where it cannot. A packed tensor is one batch entry (its batch stride
// is 0) of all its tokens.
inline bool describe(CUtensorMap* map, HeadBatchCoordinates& at, const void* base,
                     const AttentionStrides& strides, int64_t batch, int64_t heads,
                     int64_t seqlen, int64_t head_dim) {
  const TileMapShape shape{base,         2,         head_dim, seqlen, heads, strides.seq,
                           strides.head, kTileRows, batch,    strides.batch};
  at = {tile_map_batched(shape), tile_map_grouped(shape)};
  return encode_tile_map_4d(map, shape);
}

inline bool describe_operands(const AttentionParams& p, Arguments& args) {
  args.params = p;
  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t rows_q = packed ? p.tokens_q : p.seqlen_q;
  const int64_t rows_k = packed ? p.tokens_k : p.seqlen_k;
  return describe(&args.map_q, args.q_at, p.q, p.q_strides, p.batch, p.heads, rows_q,
                  p.head_dim) &&
         describe(&args.map_k, args.k_at, p.k, p.k_strides, p.batch, p.heads_kv, rows_k,
                  p.head_dim) &&
         describe(&args.map_v, args.v_at, p.v, p.v_strides, p.batch, p.heads_kv, rows_k,
                  p.head_dim);
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, int kHeadDim, bool kCausal>
cudaError_t launch(const Arguments& args, cudaStream_t stream) {
  const auto kernel = attention_fwd_tma_kernel<T, kHeadDim, kCausal>;
  constexpr int kBytes = kSmemBytes<kHeadDim>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (err != cudaSuccess) return err;
  kernel<<<attention_sm80::query_grid<kBlockM>(args.params), kRingThreads, kBytes, stream>>>(
      args);
  return cudaGetLastError();
}

// The TMA kernel where `tma`, takes_tma and the tile maps allow, else the cp.async one.
template <typename T>
cudaError_t run(const AttentionParams& p, bool causal, bool tma, cudaStream_t stream) {
  if (tma && takes_tma(p)) {
    Arguments args;
    if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
    if (describe_operands(p, args)) {
      const bool wide = p.head_dim > 64;
      if (causal) {
        return wide ? launch<T, 128, true>(args, stream) : launch<T, 64, true>(args, stream);
      }
      return wide ? launch<T, 128, false>(args, stream) : launch<T, 64, false>(args, stream);
    }
  }
  return attention_sm90a::run<T>(p, causal, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace attention_tma_sm90a
}  // namespace tilesmith

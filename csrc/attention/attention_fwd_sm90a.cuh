// Flash-style attention forward for Hopper (sm_90a) on wgmma: the schedule of
// attention_fwd_sm80.cuh (online softmax over key blocks, scores in the log2 domain, P kept
// in registers), with both products on warpgroup MMA, which mma.sync cannot match on an
// H100.
//
// One block of two warpgroups computes 128 query rows (64 per warpgroup) of one (batch,
// head) and walks the keys 128 at a time. Q, and three stages of K and V, sit in shared
// memory in the 128-byte swizzle that wgmma's descriptors read, filled by cp.async (the next
// key block loads while this one computes):
//   S = Q K^T: eight wgmma m64n128k16 per warpgroup, Q the K-major A (head dim along its
//     128-byte rows) and K the K-major B, both straight from their tiles;
//   O += P V: P is rounded to T in registers, where the S accumulators already lie in the A
//     fragment layout of a register-A wgmma; V's tile (keys along rows, head dim along the
//     bytes) is its N-major B, read through the transpose immediate.
// Step j issues S_j, then the previous block's P V, and waits only for S_j: the softmax of
// S_j runs on the CUDA cores while the tensor cores finish P_{j-1} V_{j-1} (hence the
// third stage: V_{j-1} is still read while block j + 1 loads). In the SASS of nvcc 13.0,
// ptxas places that wait part-way into the softmax, ahead of its exponentials, so the
// overlap is partial; measuring and improving it waits for a GPU.
// Head dims up to 128 (multiples of 8) run here, in a kernel 64 or 128 wide, zero-filled to
// its width like the sm_80 kernels. A bool or additive mask is read from global memory for
// each score in the softmax; dropout draws the mask of dropout_sm80.cuh (the same bits as
// every other kernel) before each step's scores are live. Each is a kernel of its own
// (kMasked, kDropout), so that the plain one keeps its registers.
//
// attention_fwd_tma_sm90a.cuh runs the same steps (ForwardRows below) fed by a TMA producer
// warpgroup, for the calls without a mask or dropout that its tile maps can read, its two
// warpgroups taking turns at the tensor cores. Here the two keep in step (a __syncthreads
// publishes each block's copies), so they cannot take turns.
#pragma once

#include <cmath>
#include <type_traits>

#include "../common/tiles_sm90a.cuh"
#include "../common/wgmma_sm90a.cuh"
#include "attention_fwd_sm80.cuh"

namespace tilesmith {
namespace attention_sm90a {

using attention_sm80::Sequence;

constexpr int kMaxHeadDim = 128;  // kernels 64 and 128 wide: kHeadDim below
constexpr int kBlockM = 128;  // query rows per block, 64 per warpgroup
constexpr int kBlockN = 128;  // keys per step
constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kStages = 3;
// A tile of 128 rows (query rows or keys) by the head dim: kHeadDim / 64 blocks of 128
// swizzled 128-byte rows, block c holding head-dim columns 64c .. 64c + 63.
constexpr int kTileRows = 128;
template <int kHeadDim>
constexpr int kTileBytes = (kHeadDim / 64) * kTileRows * kSwizzleRowBytes;  // 16 or 32 KiB
// Q, then the stages of K, then those of V, and the 1024 bytes that align the start: 225 KiB
// of the 227 an H100 block may have at head dim 128.
template <int kHeadDim>
constexpr int kSmemBytes = (1 + 2 * kStages) * kTileBytes<kHeadDim> + 1024;
static_assert(kSmemBytes<kMaxHeadDim> <= 227 * 1024, "more than an sm_90 block may have");

// Descriptor of k-step kk (16 head-dim columns) of a tile of kRows rows read K-major (Q or
// K as A, K or Q as B): its column blocks lie kRows 128-byte rows apart.
template <int kRows = kTileRows>
__device__ __forceinline__ uint64_t k_major_step(uint32_t tile, int kk) {
  return smem_descriptor_sw128(tile + (kk / 4) * kRows * kSwizzleRowBytes + (kk % 4) * 32);
}

// Descriptor of k-step kk (16 rows: keys of V, or queries of Q and dO in the backward) of a
// tile of kRows rows read N-major: 16 rows further down, the head dim's 64-column blocks
// kRows rows apart.
template <int kRows = kTileRows>
__device__ __forceinline__ uint64_t n_major_step(uint32_t tile, int kk) {
  return smem_descriptor_sw128(tile + kk * 16 * kSwizzleRowBytes, kRows * kSwizzleRowBytes);
}

// Rows first .. first + kRows - 1 of one sequence's (seq, head_dim) matrix into a tile of
// kHeadDim / 64 column blocks; rows past `rows` and columns past head_dim are zero-filled.
template <typename T, int kRows, int kHeadDim>
__device__ __forceinline__ void load_rows(uint8_t* tile, const T* matrix, int64_t first,
                                          int64_t rows, int64_t seq_stride, int64_t head_dim) {
  load_swizzled_tile<T, kThreads, kRows, kHeadDim / 64>(tile, matrix, first, rows, 0, head_dim,
                                                        seq_stride);
}

// Rounds accumulators of kColumns columns (wgmma_m64nk16's layout) to T as the A fragments
// of the product they feed (wgmma_m64nk16_a_registers): its k-step kk takes their column
// tiles 2 kk and 2 kk + 1.
template <typename T, int kColumns>
__device__ __forceinline__ void to_a_fragments(const float (&acc)[kColumns / 2],
                                               uint32_t (&frag)[kColumns / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kColumns / 16; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      frag[kk][r] = pack_pair<T>(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
    }
  }
}

// Stores this thread's columns of row `half` of head-dim-wide accumulators, times `scale`, in
// `row` (a row of a (seq, head_dim) matrix); the columns past head_dim are padding.
template <int kHeadDim, typename T>
__device__ __forceinline__ void store_row(T* row, const float (&acc)[kHeadDim / 2], int half,
                                          float scale, int64_t head_dim) {
  const int quad_col = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int di = 0; di < kHeadDim / 8; ++di) {
    if (di * 8 >= head_dim) break;
    const int i = 4 * di + 2 * half;
    *reinterpret_cast<uint32_t*>(row + di * 8 + quad_col) =
        pack_pair<T>(acc[i] * scale, acc[i + 1] * scale);
  }
}

// Whether these kernels (this forward, and the backward of attention_bwd_sm90a.cuh) take
// the call: the head dims of the 128-wide kernel, and a mask or dropout but not both (the
// dK/dV kernel with both spills at head dim 128); a forward split over the keys is left to
// attention_fwd_sm80.cuh.
inline bool takes(const AttentionParams& p) {
  return p.head_dim <= kMaxHeadDim &&
         !(p.mask_kind != MaskKind::kNone && p.dropout_seed != nullptr) && key_splits(p) == 1;
}

// Calls variant(width, causal, masked, dropout), each a std::integral_constant, for the
// kernel that takes the call (takes(p) holds): the narrower width (64 or 128) that holds the
// head dim, causal or not, with a mask, with dropout or with neither. The launchers and the
// CPU emulator choose through this one function.
template <typename Variant>
auto with_variant(const AttentionParams& p, bool causal, Variant&& variant) {
  using Yes = std::true_type;
  using No = std::false_type;
  auto by_extras = [&](auto width, auto is_causal) {
    if (p.mask_kind != MaskKind::kNone) return variant(width, is_causal, Yes{}, No{});
    if (p.dropout_seed != nullptr) return variant(width, is_causal, No{}, Yes{});
    return variant(width, is_causal, No{}, No{});
  };
  auto by_causal = [&](auto width) {
    return causal ? by_extras(width, Yes{}) : by_extras(width, No{});
  };
  return p.head_dim <= 64 ? by_causal(std::integral_constant<int, 64>{})
                          : by_causal(std::integral_constant<int, 128>{});
}

// One warpgroup's 64 query rows of the forward, walking the key blocks: O, the running row
// maxima and sums, and the previous block's P. Both forward kernels (this file's, whose
// warpgroups load K and V with cp.async, and attention_fwd_tma_sm90a.cuh's, fed by a TMA
// producer) run their warpgroups through it; they differ only in how a block's tiles arrive
// and are given back.
template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
struct ForwardRows {
  const AttentionParams& p;
  const int64_t b, h, seqlen_q, seqlen_k;
  const int64_t warp_row0;  // this warp's first query row
  const int lane, quad_col;
  // This thread's two rows of every accumulator tile (wgmma_m64nk16's layout); quad_col
  // is its first column in each 8-wide column tile.
  int64_t rows[2];
  attention_sm80::DropoutMask dropout{};
  float acc_o[kHeadDim / 2] = {};  // acc_o[4 di + 2 half + e]: row rows[half], column 8 di + ...
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's columns only; summed over the quad at the end
  // P of the previous key block, rounded to T: k-step kk (keys 16 kk .. 16 kk + 15) is S's
  // column tiles 2 kk and 2 kk + 1, which are, pair by pair, the A fragment of
  // wgmma_m64nk16_a_registers.
  uint32_t frag_p[kBlockN / 16][4];

  // The rows of warpgroup `warpgroup` of a block whose first query row is row0.
  __device__ __forceinline__ ForwardRows(const AttentionParams& params, int64_t batch,
                                         int64_t head, const Sequence& seq, int64_t row0,
                                         int warpgroup)
      : p(params),
        b(batch),
        h(head),
        seqlen_q(seq.seqlen_q),
        seqlen_k(seq.seqlen_k),
        warp_row0(row0 + warpgroup * 64 + ((threadIdx.x / 32) % 4) * 16),
        lane(threadIdx.x % 32),
        quad_col(2 * (threadIdx.x % 4)) {
    rows[0] = warp_row0 + lane / 4;
    rows[1] = warp_row0 + lane / 4 + 8;
    if constexpr (kDropout) dropout = attention_sm80::DropoutMask::of(p);
  }

  // O += P V for the key block whose V tile is at shared address v_tile.
  __device__ __forceinline__ void issue_pv(uint32_t v_tile) {
    wgmma_fence();  // acc_o and frag_p were last written by this thread before this point
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      wgmma_m64nk16_a_registers<kHeadDim, T, 1>(acc_o, frag_p[kk], n_major_step(v_tile, kk), 1);
    }
    wgmma_commit();
  }

  // The key block from key0, its K tile at shared address k_tile, this warpgroup's 64 rows
  // of Q at q_tile. issue_previous() issues the previous block's P V (issue_pv) and returns
  // true, or returns false at the first block; s_retired() runs once S's wgmma retired (its
  // K tile is no longer read), pv_retired() once the previous P V's did (its V tile).
  template <typename IssuePrevious, typename SRetired, typename PvRetired>
  __device__ __forceinline__ void step(uint32_t q_tile, uint32_t k_tile, int64_t key0,
                                       IssuePrevious&& issue_previous, SRetired&& s_retired,
                                       PvRetired&& pv_retired) {
    // Dropout: bit 4 (ni % 8) + 2 half + e of kept[ni / 8] keeps s[4 ni + 2 half + e], drawn
    // before S is live (drawn while the products run, ptxas serialises the wgmmas: C7514).
    // Dropped probabilities still count in the normaliser; they only leave the product with V.
    uint32_t kept[kBlockN / 64] = {};
    if constexpr (kDropout) {
#pragma unroll
      for (int w = 0; w < kBlockN / 64; ++w) {
        kept[w] = dropout.tile_bits_rows<8>(rows, key0 + 64 * w + quad_col, b * p.heads + h,
                                            lane);
      }
    }

    // S = Q K^T: s[4 ni + 2 half + e] is row rows[half], key key0 + 8 ni + quad_col + e.
    // Then the previous block's P V, which the tensor cores run while this warpgroup's
    // softmax of S runs; S retires first.
    float s[kBlockN / 2] = {};
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      wgmma_m64nk16<kBlockN, T, 0, 0>(s, k_major_step(q_tile, kk), k_major_step(k_tile, kk), 1);
    }
    wgmma_commit();
    if (issue_previous()) {
      wgmma_wait<1>();
    } else {
      wgmma_wait<0>();
    }
    fence_registers(s);  // read after the wait
    s_retired();

    // Online softmax, one row (half) at a time, as attention_fwd_sm80.cuh's. Without a mask
    // tensor only blocks that reach past the last key or this warp's diagonal need masking:
    // there row rows[half] sees the block's keys before `visible` (the last key, or just past
    // its diagonal), counted in 32 bits from key0; the mask tensor then acts on those.
    const bool needs_mask =
        kMasked || key0 + kBlockN > seqlen_k || (kCausal && key0 + kBlockN - 1 > warp_row0);
    float rescale[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int visible = static_cast<int>(seqlen_k - key0 < kBlockN ? seqlen_k - key0 : kBlockN);
      if (kCausal && rows[half] - key0 < visible) {
        visible = static_cast<int>(rows[half] - key0 + 1);  // may be 0 or less: none
      }
      if (kMasked && rows[half] >= seqlen_q) visible = 0;  // the mask has no such row
      float block_max = -INFINITY;
#pragma unroll
      for (int ni = 0; ni < kBlockN / 8; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[4 * ni + 2 * half + e] * p.scale_log2;
          if (needs_mask) {
            const int column = ni * 8 + quad_col + e;
            if (column >= visible) {
              x = -INFINITY;
            } else if constexpr (kMasked) {
              x += attention_sm80::mask_log2<T>(p, b, h, rows[half], key0 + column);
            }
          }
          s[4 * ni + 2 * half + e] = x;
          block_max = fmaxf(block_max, x);
        }
      }
      const float new_max = fmaxf(row_max[half], quad_max(block_max));
      // A row that has seen only masked keys keeps max -inf: exponentiate against 0 so
      // that -inf - (-inf) never makes a NaN.
      const float base = new_max == -INFINITY ? 0.0f : new_max;
      rescale[half] = exp2f(row_max[half] - base);
      row_max[half] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int ni = 0; ni < kBlockN / 8; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float prob = exp2f(s[4 * ni + 2 * half + e] - base);
          sum += prob;
          const bool dropped =
              kDropout && !((kept[ni / 8] >> (4 * (ni % 8) + 2 * half + e)) & 1);
          s[4 * ni + 2 * half + e] = dropped ? 0.0f : prob;
        }
      }
      row_sum[half] = row_sum[half] * rescale[half] + sum;
    }

    // The softmax above is done before the wait, while the previous block's P V runs. That
    // has then added its share to acc_o (relative to the old maxima) and no longer reads
    // frag_p.
    fence_registers(s);
    fence_registers(rescale);
    fence_registers(row_sum);
    wgmma_wait<0>();
    fence_registers(acc_o);
    pv_retired();
#pragma unroll
    for (int di = 0; di < kHeadDim / 8; ++di) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        acc_o[4 * di + 2 * half] *= rescale[half];
        acc_o[4 * di + 2 * half + 1] *= rescale[half];
      }
    }
    to_a_fragments<T, kBlockN>(s, frag_p);
  }

  // The last block's P V (its V tile at v_tile), waited for.
  __device__ __forceinline__ void finish(uint32_t v_tile) {
    issue_pv(v_tile);
    wgmma_wait<0>();
    fence_registers(acc_o);
  }

  // O / l (times 1 / (1 - dropout_p) with dropout) and lse = (max + log2 l) ln 2 of this
  // thread's rows of sequence `seq`. A row with no visible key (l = 0) gives zeros and lse =
  // -inf, as PyTorch does.
  __device__ __forceinline__ void store(const Sequence& seq) {
    T* out = attention_sm80::row_pointer<T>(p.out, p.out_strides, b, h, seq.q_start);
    float* lse = p.lse + seq.stats;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float total = quad_sum(row_sum[half]);
      if (rows[half] >= seqlen_q) continue;
      const float inv = total > 0.0f ? (kDropout ? p.dropout_scale : 1.0f) / total : 0.0f;
      store_row<kHeadDim>(out + rows[half] * p.out_strides.seq, acc_o, half, inv, p.head_dim);
      if (lane % 4 == 0) {
        lse[rows[half]] =
            total > 0.0f ? (row_max[half] + log2f(total)) * attention_sm80::kLn2 : -INFINITY;
      }
    }
  }
};

// The key blocks the block whose first query row is row0 visits. Causal masking is aligned
// top-left (key <= query), as in PyTorch's SDPA.
template <bool kCausal>
__device__ __forceinline__ int key_blocks_for(int64_t row0, int64_t seqlen_k) {
  const int64_t key_end = kCausal && row0 + kBlockM < seqlen_k ? row0 + kBlockM : seqlen_k;
  return static_cast<int>((key_end + kBlockN - 1) / kBlockN);
}

template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttentionParams p) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_q = aligned_shared(shared_bytes);
  uint8_t* smem_k = smem_q + kTileBytes<kHeadDim>;
  uint8_t* smem_v = smem_k + kStages * kTileBytes<kHeadDim>;

  const int64_t row0 = attention_sm80::query_block<kBlockM>(kCausal);
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t h_kv = h / (p.heads / p.heads_kv);
  const Sequence seq = attention_sm80::sequence(p, b, h);
  if (row0 >= seq.seqlen_q) return;  // packed batches launch for the longest sequence
  using attention_sm80::row_pointer;
  const T* q = row_pointer<const T>(p.q, p.q_strides, b, h, seq.q_start);
  const T* k = row_pointer<const T>(p.k, p.k_strides, b, h_kv, seq.k_start);
  const T* v = row_pointer<const T>(p.v, p.v_strides, b, h_kv, seq.k_start);
  const int key_blocks = key_blocks_for<kCausal>(row0, seq.seqlen_k);

  auto load_kv = [&](int stage, int block) {
    const int64_t n0 = static_cast<int64_t>(block) * kBlockN;
    load_rows<T, kTileRows, kHeadDim>(smem_k + stage * kTileBytes<kHeadDim>, k, n0,
                                      seq.seqlen_k, p.k_strides.seq, p.head_dim);
    load_rows<T, kTileRows, kHeadDim>(smem_v + stage * kTileBytes<kHeadDim>, v, n0,
                                      seq.seqlen_k, p.v_strides.seq, p.head_dim);
  };
  load_rows<T, kTileRows, kHeadDim>(smem_q, q, row0, seq.seqlen_q, p.q_strides.seq,
                                    p.head_dim);
  if (key_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const int warpgroup = threadIdx.x / 128;
  ForwardRows<T, kHeadDim, kCausal, kMasked, kDropout> mine(p, b, h, seq, row0, warpgroup);
  // This warpgroup's 64 rows of Q: 64 rows into each column block.
  const uint32_t q_tile = shared_address(smem_q) + warpgroup * 64 * kSwizzleRowBytes;
  auto v_tile = [&](int block) {
    return shared_address(smem_v + (block % kStages) * kTileBytes<kHeadDim>);
  };

  for (int j = 0; j < key_blocks; ++j) {
    cp_async_wait<0>();          // K_j, V_j (and at j = 0, Q) have landed for this thread
    fence_proxy_async_shared();  // ... visible to wgmma's reads
    // For every thread; and every warpgroup has retired block j - 2's P V (in step j - 1),
    // so the stage that held block j - 2 takes block j + 1.
    __syncthreads();
    if (j + 1 < key_blocks) load_kv((j + 1) % kStages, j + 1);
    cp_async_commit();
    const uint32_t k_tile = shared_address(smem_k + (j % kStages) * kTileBytes<kHeadDim>);
    mine.step(
        q_tile, k_tile, static_cast<int64_t>(j) * kBlockN,
        [&] {
          if (j == 0) return false;
          mine.issue_pv(v_tile(j - 1));
          return true;
        },
        [] {}, [] {});
  }
  if (key_blocks > 0) mine.finish(v_tile(key_blocks - 1));
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits
  mine.store(seq);
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<T, kHeadDim, kCausal, kMasked, kDropout>;
  constexpr int kBytes = kSmemBytes<kHeadDim>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (err != cudaSuccess) return err;
  kernel<<<attention_sm80::query_grid<kBlockM>(p), kThreads, kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const AttentionParams& p, bool causal, cudaStream_t stream) {
  if (!takes(p)) return cudaErrorNotSupported;
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  return with_variant(p, causal, [&](auto width, auto is_causal, auto masked, auto dropout) {
    return launch<T, decltype(width)::value, decltype(is_causal)::value,
                  decltype(masked)::value, decltype(dropout)::value>(p, stream);
  });
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace attention_sm90a
}  // namespace tilesmith

// Flash-style attention forward for sm_80 and newer (FlashAttention-2's schedule, written
// for this project): one block computes 64 query rows of one (batch, head), 16 per warp, and
// walks the keys 64 at a time (32 at head dim 256). Q stays in registers (in shared memory at
// head dim 256); K and V tiles are double-buffered in swizzled shared memory through
// cp.async, so the next tile loads while this one computes.
// Scores S = Q K^T and the output O += P V run on mma.sync m16n8k16 with fp32 accumulators;
// P never leaves registers: the accumulator layout of S is, pair by pair, the A-operand
// layout of the next mma, so P is only rounded to T and repacked. Scores are kept in the
// log2 domain (scale * log2 e) so that the online softmax's exponentials are exp2.
#pragma once

#include <cmath>

#include "../common/mma_sm80.cuh"
#include "../common/tiles_sm80.cuh"
#include "attention.h"
#include "dropout_sm80.cuh"

namespace tilesmith {
namespace attention_sm80 {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 64;  // query rows per block, 16 per warp
constexpr int kBlockN = 64;  // keys per step (head dims up to 128), and per dK/dV block

// Head dim 256: O's accumulators alone take 128 registers a thread, so the forward steps
// through the keys 32 at a time (half the score registers) and reads Q's fragments from
// shared memory at each step instead of holding 64 registers of them.
template <int kHeadDim>
constexpr int kFwdStepKeys = kHeadDim > 128 ? 32 : kBlockN;
template <int kHeadDim>
constexpr bool kQInRegisters = kHeadDim <= 128;
constexpr float kLn2 = 0.69314718055994531f;

template <typename T, int kHeadDim>
constexpr int fwd_smem_bytes() {
  // Q, then two stages of K and two of V.
  return (kBlockM + 4 * kFwdStepKeys<kHeadDim>) * kHeadDim * static_cast<int>(sizeof(T));
}

// One (sequence, head) of a launch: where its tokens start in q/out and k/v, its lengths,
// and where its rows start in lse/delta.
struct Sequence {
  int64_t q_start, k_start, seqlen_q, seqlen_k, stats;
};

__device__ __forceinline__ Sequence sequence(const AttentionParams& p, int64_t b, int64_t h) {
  Sequence s{0, 0, p.seqlen_q, p.seqlen_k, 0};
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.k_start = p.cu_seqlens_k[b];
    s.seqlen_q = p.cu_seqlens_q[b + 1] - s.q_start;
    s.seqlen_k = p.cu_seqlens_k[b + 1] - s.k_start;
  }
  s.stats = b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start;
  return s;
}

// Row `row` of (batch b, head h) of a tensor with these strides.
template <typename T, typename Pointer>
__device__ __forceinline__ T* row_pointer(Pointer base, const AttentionStrides& strides,
                                          int64_t b, int64_t h, int64_t row) {
  return static_cast<T*>(base) + b * strides.batch + h * strides.head + row * strides.seq;
}

constexpr float kLog2e = 1.44269504088896341f;

// What the mask does to the score of (row, key), both in range, in the log2 domain: 0 keeps
// it, -inf drops it, an additive mask adds its value * log2(e).
template <typename T>
__device__ __forceinline__ float mask_log2(const AttentionParams& p, int64_t b, int64_t h,
                                           int64_t row, int64_t key) {
  const int64_t at = b * p.mask_strides.batch + h * p.mask_strides.head +
                     row * p.mask_strides.row + key * p.mask_strides.key;
  if (p.mask_kind == MaskKind::kBool) {
    return static_cast<const uint8_t*>(p.mask)[at] != 0 ? 0.0f : -INFINITY;
  }
  return to_float<T>(static_cast<const T*>(p.mask)[at]) * kLog2e;
}

// Rows row0 .. row0 + kRows of one sequence's (seq, head_dim) matrix into a swizzled tile
// kHeadDim wide; rows past `rows` and columns past `head_dim` (a multiple of 8) are
// zero-filled, so a narrower head dim runs in the next wider kernel: the zero columns add
// nothing to Q K^T and give zero columns of O, dQ, dK and dV, which are not stored. Every
// row is read with 16-byte cp.async.
template <typename T, int kRows, int kHeadDim>
__device__ __forceinline__ void load_rows(T* tile, const T* sequence, int64_t row0, int64_t rows,
                                          int64_t seq_stride, int64_t head_dim) {
  load_tile<T, kRows, kHeadDim, kThreads, true>(tile, sequence, row0, 0, rows, head_dim,
                                                seq_stride, 1);
}

// The first query row of this block of kRows. Block x of a causal launch takes query block
// (blocks - 1 - x): the longest rows start first and the short ones fill the tail.
template <int kRows = kBlockM>
__device__ __forceinline__ int64_t query_block(bool causal) {
  const int x = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  return static_cast<int64_t>(x) * kRows;
}

template <typename T, int kHeadDim, bool kCausal, bool kDropout>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  constexpr int kStepN = kFwdStepKeys<kHeadDim>;
  using TileQ = SwizzledTile<kBlockM, kHeadDim>;
  using TileKV = SwizzledTile<kStepN, kHeadDim>;
  constexpr int kSteps = kHeadDim / 16;  // k-steps of S = Q K^T
  constexpr int kKeyTiles = kStepN / 8;  // n-tiles of S
  constexpr int kDimTiles = kHeadDim / 8; // n-tiles of O
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_q = reinterpret_cast<T*>(shared_bytes);
  T* smem_k = smem_q + TileQ::kElements;
  T* smem_v = smem_k + 2 * TileKV::kElements;

  const int64_t row0 = query_block(kCausal);
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t h_kv = h / (p.heads / p.heads_kv);
  const Sequence seq = sequence(p, b, h);
  if (row0 >= seq.seqlen_q) return;  // packed batches launch for the longest sequence
  const int64_t seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  const T* q = row_pointer<const T>(p.q, p.q_strides, b, h, seq.q_start);
  const T* k = row_pointer<const T>(p.k, p.k_strides, b, h_kv, seq.k_start);
  const T* v = row_pointer<const T>(p.v, p.v_strides, b, h_kv, seq.k_start);
  // Causal masking is aligned top-left (key <= query), as in PyTorch's SDPA.
  const int64_t key_end = kCausal && row0 + kBlockM < seqlen_k ? row0 + kBlockM : seqlen_k;
  const int key_blocks = static_cast<int>((key_end + kStepN - 1) / kStepN);

  auto load_kv = [&](int stage, int block) {
    const int64_t n0 = static_cast<int64_t>(block) * kStepN;
    load_rows<T, kStepN, kHeadDim>(smem_k + stage * TileKV::kElements, k, n0, seqlen_k,
                                   p.k_strides.seq, p.head_dim);
    load_rows<T, kStepN, kHeadDim>(smem_v + stage * TileKV::kElements, v, n0, seqlen_k,
                                   p.v_strides.seq, p.head_dim);
  };
  load_rows<T, kBlockM, kHeadDim>(smem_q, q, row0, seqlen_q, p.q_strides.seq, p.head_dim);
  if (key_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const int lane = threadIdx.x % 32;
  const int warp_row0 = (threadIdx.x / 32) * 16;
  // This thread's two rows of every accumulator tile, and its first column in each.
  const int64_t rows[2] = {row0 + warp_row0 + lane / 4, row0 + warp_row0 + lane / 4 + 8};
  const int quad_col = 2 * (lane % 4);

  uint32_t frag_q[kQInRegisters<kHeadDim> ? kSteps : 1][4];  // Q, or one k-step of it
  float acc_o[kDimTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's columns only; summed over the quad at the end
  DropoutMask dropout{};
  if constexpr (kDropout) dropout = DropoutMask::of(p);

  for (int j = 0; j < key_blocks; ++j) {
    cp_async_wait<0>();  // K_j, V_j (and at j = 0, Q) have landed for this thread
    __syncthreads();     // ... for every thread; and stage (j + 1) % 2 is free again
    if constexpr (kQInRegisters<kHeadDim>) {
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < kSteps; ++kk) {
          load_fragment_a<TileQ>(frag_q[kk], smem_q, warp_row0, kk * 16, lane);
        }
      }
    }
    if (j + 1 < key_blocks) load_kv((j + 1) % 2, j + 1);
    cp_async_commit();
    const T* sk = smem_k + (j % 2) * TileKV::kElements;
    const T* sv = smem_v + (j % 2) * TileKV::kElements;

    const int64_t key0 = static_cast<int64_t>(j) * kStepN;
    // Dropout: bit 4 * ni + (half * 2 + e) of `kept` for entry [ni][half * 2 + e], drawn
    // before S is live (fewer registers at once). Dropped probabilities still count in the
    // normaliser; they only leave the product with V.
    uint32_t kept = 0;
    if constexpr (kDropout) {
      kept = dropout.tile_bits_rows<kKeyTiles>(rows, key0 + quad_col, b * p.heads + h, lane);
    }

    // S = Q K^T. K's [key][dim] tile is B = K^T in the column-major form mma wants as is.
    float s[kKeyTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      const int q_step = kQInRegisters<kHeadDim> ? kk : 0;
      if constexpr (!kQInRegisters<kHeadDim>) {
        load_fragment_a<TileQ>(frag_q[0], smem_q, warp_row0, kk * 16, lane);
      }
#pragma unroll
      for (int ni = 0; ni < kKeyTiles; ni += 2) {
        uint32_t regs[4];
        load_fragments_b_nk<TileKV>(regs, sk, ni * 8, kk * 16, lane);
        mma_16816<T>(s[ni], frag_q[q_step], regs[0], regs[1]);
        mma_16816<T>(s[ni + 1], frag_q[q_step], regs[2], regs[3]);
      }
    }

    // Online softmax, one row (half) at a time. Without a mask tensor only blocks that reach
    // past the last key or the diagonal need masking; the test is uniform across the warp.
    const bool needs_mask = key0 + kStepN > seqlen_k || p.mask_kind != MaskKind::kNone ||
                            (kCausal && key0 + kStepN - 1 > row0 + warp_row0);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float block_max = -INFINITY;
#pragma unroll
      for (int ni = 0; ni < kKeyTiles; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[ni][half * 2 + e] * p.scale_log2;
          if (needs_mask) {
            const int64_t key = key0 + ni * 8 + quad_col + e;
            if (key >= seqlen_k || rows[half] >= seqlen_q || (kCausal && key > rows[half])) {
              x = -INFINITY;
            } else if (p.mask_kind != MaskKind::kNone) {
              x += mask_log2<T>(p, b, h, rows[half], key);
            }
          }
          s[ni][half * 2 + e] = x;
          block_max = fmaxf(block_max, x);
        }
      }
      const float new_max = fmaxf(row_max[half], quad_max(block_max));
      // A row that has seen only masked keys keeps max -inf: exponentiate against 0 so
      // that -inf - (-inf) never makes a NaN.
      const float base = new_max == -INFINITY ? 0.0f : new_max;
      const float rescale = exp2f(row_max[half] - base);
      row_max[half] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int ni = 0; ni < kKeyTiles; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float prob = exp2f(s[ni][half * 2 + e] - base);
          sum += prob;
          const bool dropped = kDropout && !((kept >> (4 * ni + half * 2 + e)) & 1);
          s[ni][half * 2 + e] = dropped ? 0.0f : prob;
        }
      }
      row_sum[half] = row_sum[half] * rescale + sum;
#pragma unroll
      for (int di = 0; di < kDimTiles; ++di) {
        acc_o[di][half * 2] *= rescale;
        acc_o[di][half * 2 + 1] *= rescale;
      }
    }

    // O += P V. Key tiles 2i and 2i + 1 of S are the A fragment of k-step i; V's
    // [key][dim] tile is B row-major, so ldmatrix transposes it.
#pragma unroll
    for (int kk = 0; kk < kStepN / 16; ++kk) {
      uint32_t frag_p[4];
      accumulators_to_fragment_a<T>(frag_p, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int di = 0; di < kDimTiles; di += 2) {
        uint32_t regs[4];
        load_fragments_b_kn<TileKV>(regs, sv, kk * 16, di * 8, lane);
        mma_16816<T>(acc_o[di], frag_p, regs[0], regs[1]);
        mma_16816<T>(acc_o[di + 1], frag_p, regs[2], regs[3]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  // O / l (times 1 / (1 - dropout_p) with dropout), and lse = (max + log2 l) ln 2. A row
  // with no visible key (l = 0) gives zeros and lse = -inf, as PyTorch does.
  T* out = row_pointer<T>(p.out, p.out_strides, b, h, seq.q_start);
  float* lse = p.lse + seq.stats;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float total = quad_sum(row_sum[half]);
    if (rows[half] >= seqlen_q) continue;
    const float inv = total > 0.0f ? (kDropout ? p.dropout_scale : 1.0f) / total : 0.0f;
    T* out_row = out + rows[half] * p.out_strides.seq + quad_col;
#pragma unroll
    for (int di = 0; di < kDimTiles; ++di) {
      if (di * 8 >= p.head_dim) break;  // padding columns
      *reinterpret_cast<uint32_t*>(out_row + di * 8) =
          pack_pair<T>(acc_o[di][half * 2] * inv, acc_o[di][half * 2 + 1] * inv);
    }
    if (lane % 4 == 0) {
      lse[rows[half]] = total > 0.0f ? (row_max[half] + log2f(total)) * kLn2 : -INFINITY;
    }
  }
}

// The grid of the forward and dQ kernels: one block per kRows query rows of each (batch,
// head).
template <int kRows = kBlockM>
inline dim3 query_grid(const AttentionParams& p) {
  return dim3(static_cast<unsigned>((p.seqlen_q + kRows - 1) / kRows),
              static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernel itself
template <typename T, int kHeadDim, bool kCausal, bool kDropout>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  constexpr int kSmemBytes = fwd_smem_bytes<T, kHeadDim>();
  auto kernel = attention_fwd_kernel<T, kHeadDim, kCausal, kDropout>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<query_grid(p), kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace attention_sm80
}  // namespace tilesmith

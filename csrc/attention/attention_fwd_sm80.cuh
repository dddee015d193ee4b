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
// it, -inf drops it, an additive mask adds its value * log2(e). Read through the read-only
// path (__ldg): with the third mask kind's plain loads, ptxas spilled the sm_90 build of the
// d256 dK kernel with dropout (8 bytes); with __ldg nothing spills.
template <typename T>
__device__ __forceinline__ float mask_log2(const AttentionParams& p, int64_t b, int64_t h,
                                           int64_t row, int64_t key) {
  const int64_t at = b * p.mask_strides.batch + h * p.mask_strides.head +
                     row * p.mask_strides.row + key * p.mask_strides.key;
  if (p.mask_kind == MaskKind::kBool) {
    return __ldg(static_cast<const uint8_t*>(p.mask) + at) != 0 ? 0.0f : -INFINITY;
  }
  const float value = p.mask_kind == MaskKind::kAdditiveFloat32
                          ? __ldg(static_cast<const float*>(p.mask) + at)
                          : to_float<T>(__ldg(static_cast<const T*>(p.mask) + at));
  return value * kLog2e;
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

// The first query row of this block of kRows. Query block x of a causal launch takes rows
// from block (blocks - 1 - x): the longest rows start first and the short ones fill the
// tail. A forward split over the keys launches `splits` blocks per query block, side by side.
template <int kRows = kBlockM>
__device__ __forceinline__ int64_t query_block(bool causal, int splits = 1) {
  const int blocks = gridDim.x / splits, x = blockIdx.x / splits;
  return static_cast<int64_t>(causal ? blocks - 1 - x : x) * kRows;
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

  // The split (if any) is recomputed where it is needed rather than held in registers
  // through the loop: two more live values there made ptxas spill (head dim 64, dropout).
  const int64_t row0 = query_block(kCausal, static_cast<int>(key_splits(p)));
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
  // Key blocks first_block .. end_block - 1: all of them, or this split's (none, for a split
  // past the diagonal or past a short packed sequence's keys).
  int first_block = 0, end_block = static_cast<int>((key_end + kStepN - 1) / kStepN);
  if (key_splits(p) > 1) {
    const int per_split = static_cast<int>(p.keys_per_split / kStepN);
    first_block = static_cast<int>(blockIdx.x % key_splits(p)) * per_split;
    end_block = min(end_block, first_block + per_split);
  }

  auto load_kv = [&](int stage, int block) {
    const int64_t n0 = static_cast<int64_t>(block) * kStepN;
    load_rows<T, kStepN, kHeadDim>(smem_k + stage * TileKV::kElements, k, n0, seqlen_k,
                                   p.k_strides.seq, p.head_dim);
    load_rows<T, kStepN, kHeadDim>(smem_v + stage * TileKV::kElements, v, n0, seqlen_k,
                                   p.v_strides.seq, p.head_dim);
  };
  load_rows<T, kBlockM, kHeadDim>(smem_q, q, row0, seqlen_q, p.q_strides.seq, p.head_dim);
  if (first_block < end_block) load_kv(first_block % 2, first_block);
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

  if constexpr (kQInRegisters<kHeadDim>) {
    cp_async_wait<0>();  // Q (with the first K and V) has landed for this thread
    __syncthreads();     // ... for every thread
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      load_fragment_a<TileQ>(frag_q[kk], smem_q, warp_row0, kk * 16, lane);
    }
  }
  for (int j = first_block; j < end_block; ++j) {
    cp_async_wait<0>();  // K_j, V_j (and in the first step, Q) have landed for this thread
    __syncthreads();     // ... for every thread; and stage (j + 1) % 2 is free again
    if (j + 1 < end_block) load_kv((j + 1) % 2, j + 1);
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
  // with no visible key (l = 0) gives zeros and lse = -inf, as PyTorch does. A split writes
  // the same, in fp32, to its partials.
  T* out = row_pointer<T>(p.out, p.out_strides, b, h, seq.q_start);
  float* lse = p.lse + seq.stats;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float total = quad_sum(row_sum[half]);
    if (rows[half] >= seqlen_q) continue;
    const float inv = total > 0.0f ? (kDropout ? p.dropout_scale : 1.0f) / total : 0.0f;
    const float row_lse = total > 0.0f ? (row_max[half] + log2f(total)) * kLn2 : -INFINITY;
    if (key_splits(p) > 1) {
      const int64_t at = blockIdx.x % key_splits(p) * lse_rows(p) + seq.stats + rows[half];
      float* partial_row = p.o_partial + at * p.head_dim + quad_col;
#pragma unroll
      for (int di = 0; di < kDimTiles; ++di) {
        if (di * 8 >= p.head_dim) break;
        *reinterpret_cast<float2*>(partial_row + di * 8) =
            make_float2(acc_o[di][half * 2] * inv, acc_o[di][half * 2 + 1] * inv);
      }
      if (lane % 4 == 0) p.lse_partial[at] = row_lse;
      continue;
    }
    T* out_row = out + rows[half] * p.out_strides.seq + quad_col;
#pragma unroll
    for (int di = 0; di < kDimTiles; ++di) {
      if (di * 8 >= p.head_dim) break;  // padding columns
      *reinterpret_cast<uint32_t*>(out_row + di * 8) =
          pack_pair<T>(acc_o[di][half * 2] * inv, acc_o[di][half * 2 + 1] * inv);
    }
    if (lane % 4 == 0) lse[rows[half]] = row_lse;
  }
}

// The second pass of a split forward: out = sum_s w_s O_s / sum_s w_s with w_s = exp(lse_s -
// max_s lse_s), lse = max + log(sum_s w_s); a row no split saw a key of gives zeros and
// -inf. One block per kBlockM query rows of a (sequence, head), as the forward's grid
// without splits; each thread takes 8 columns of a row at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_split_combine_kernel(
    const AttentionParams p) {
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence(p, b, h);
  const int64_t rows = seq.seqlen_q - row0 < kBlockM ? seq.seqlen_q - row0 : kBlockM;
  const int64_t splits = key_splits(p), stride = lse_rows(p);
  const int64_t chunks = p.head_dim / 8;
  T* out = row_pointer<T>(p.out, p.out_strides, b, h, seq.q_start);
  for (int64_t item = threadIdx.x; item < rows * chunks; item += kThreads) {
    const int64_t row = row0 + item / chunks, col = item % chunks * 8;
    const int64_t stat = seq.stats + row;
    float top = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) top = fmaxf(top, p.lse_partial[s * stride + stat]);
    float acc[8] = {};
    float weights = 0.0f;
    if (top != -INFINITY) {
      for (int64_t s = 0; s < splits; ++s) {
        const float weight = expf(p.lse_partial[s * stride + stat] - top);
        const float4* partial =
            reinterpret_cast<const float4*>(p.o_partial + (s * stride + stat) * p.head_dim + col);
        const float4 lo = partial[0], hi = partial[1];
        const float values[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += weight * values[e];
        weights += weight;
      }
    }
    const float inv = weights > 0.0f ? 1.0f / weights : 0.0f;
    T* out_row = out + row * p.out_strides.seq + col;
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
      *reinterpret_cast<uint32_t*>(out_row + e) = pack_pair<T>(acc[e] * inv, acc[e + 1] * inv);
    }
    if (col == 0) p.lse[stat] = weights > 0.0f ? top + logf(weights) : -INFINITY;
  }
}

// The grid of the forward and dQ kernels: one block per kRows query rows of each (batch,
// head).
template <int kRows = kBlockM>
inline dim3 query_grid(const AttentionParams& p) {
  return dim3(static_cast<unsigned>((p.seqlen_q + kRows - 1) / kRows),
              static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
}

// Calls launch(kernel, grid, shared memory bytes) for each kernel of the forward, in order,
// while it returns true: the forward kernel, and with a split its combine. The launcher
// and the CPU emulator both run the forward through this.
template <typename T, int kHeadDim, bool kCausal, bool kDropout, typename Launch>
bool forward_plan(const AttentionParams& p, Launch&& launch) {
  dim3 grid = query_grid(p);
  const int64_t splits = key_splits(p);
  grid.x *= static_cast<unsigned>(splits);
  if (!launch(attention_fwd_kernel<T, kHeadDim, kCausal, kDropout>, grid,
              fwd_smem_bytes<T, kHeadDim>())) {
    return false;
  }
  return splits == 1 || launch(attention_split_combine_kernel<T>, query_grid(p), 0);
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernels itself
// The launch callback of forward_plan and backward_plan on the GPU: each kernel on `stream`;
// the first error is left in *err and stops the plan.
inline auto stream_launcher(const AttentionParams& p, cudaStream_t stream, cudaError_t* err) {
  return [&p, stream, err](auto kernel, dim3 grid, int smem) {
    *err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (*err != cudaSuccess) return false;
    kernel<<<grid, kThreads, smem, stream>>>(p);
    *err = cudaGetLastError();
    return *err == cudaSuccess;
  };
}

template <typename T, int kHeadDim, bool kCausal, bool kDropout>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  forward_plan<T, kHeadDim, kCausal, kDropout>(p, stream_launcher(p, stream, &err));
  return err;
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace attention_sm80
}  // namespace tilesmith

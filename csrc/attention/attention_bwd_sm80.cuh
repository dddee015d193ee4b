// Flash-style attention backward for sm_80 and newer, in two kernels that never form the
// score matrix and never use atomics (so the gradients are deterministic):
//   * dK/dV: one block owns 64 keys of one (batch, kv head), 16 per warp, and walks every
//     query block of every query head in the kv group: it recomputes P^T from the saved
//     log-sum-exp, accumulates dV += P^T dO and dK += dS^T Q in registers, and writes them
//     once (a GQA group's heads sum in registers, not in memory);
//   * dQ: one block owns 64 query rows, walks the key blocks like the forward, and
//     accumulates dQ += dS K.
// with dS = P (dP - delta), dP = dO V^T, delta = rowsum(dO * O) (computed by the caller).
// Both keep Q/dO (or K/V) resident in shared memory and double-buffer the other pair through
// cp.async; P and dS go from accumulators to A fragments in registers, as in the forward.
// At head dim 256 one warp's dK and dV accumulators would need 256 registers a thread, so
// the dK/dV kernel runs twice, once per gradient: the dV launch recomputes only P^T, the dK
// launch P^T and dP^T (five matrix products per step where one launch does four).
#pragma once

#include "attention_fwd_sm80.cuh"

namespace tilesmith {
namespace attention_sm80 {

// Query rows per step of the dK/dV kernel: 32 at head dim 128 keeps its four accumulator
// sets (dK, dV, S^T, dP^T) within the register file.
template <int kHeadDim>
constexpr int kDkdvBlockM = kHeadDim > 64 ? 32 : 64;

template <typename T, int kHeadDim>
constexpr int dkdv_smem_bytes() {
  // K and V, then two stages of Q and two of dO.
  return (2 * kBlockN + 4 * kDkdvBlockM<kHeadDim>) * kHeadDim * static_cast<int>(sizeof(T));
}

// Keys per step of the dQ kernel: at head dim 256, 16 (dQ's accumulators take 128
// registers a thread, and S and dP over 32 keys left the dropout variant 5 registers short).
template <int kHeadDim>
constexpr int kDqStepKeys = kHeadDim > 128 ? 16 : kBlockN;

template <typename T, int kHeadDim>
constexpr int dq_smem_bytes() {
  // Q and dO, then two stages of K and two of V.
  return (2 * kBlockM + 4 * kDqStepKeys<kHeadDim>) * kHeadDim * static_cast<int>(sizeof(T));
}

// Whether one dK/dV launch accumulates both gradients (else one launch each).
template <int kHeadDim>
constexpr bool kDkdvTogether = kHeadDim <= 128;

// lse * log2(e) for a row, and whether the row takes part: inside the sequence and with at
// least one visible key (lse > -inf).
__device__ __forceinline__ bool row_statistics(const float* lse, const float* delta,
                                               int64_t row, int64_t rows, float& lse_log2,
                                               float& row_delta) {
  lse_log2 = 0.0f;
  row_delta = 0.0f;
  if (row >= rows) return false;
  const float value = lse[row];
  if (value == -INFINITY) return false;
  lse_log2 = value * kLog2e;
  row_delta = delta[row];
  return true;
}

// kDk, kDv: which gradients this launch computes and writes.
template <typename T, int kHeadDim, bool kCausal, bool kDropout, bool kDk, bool kDv>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const AttentionParams p) {
  static_assert(kDk || kDv, "a launch computes at least one gradient");
  constexpr int kBlockQ = kDkdvBlockM<kHeadDim>;
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;
  using TileQ = SwizzledTile<kBlockQ, kHeadDim>;
  constexpr int kSteps = kHeadDim / 16;
  constexpr int kQueryTiles = kBlockQ / 8;  // n-tiles of S^T and dP^T
  constexpr int kDimTiles = kHeadDim / 8;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_k = reinterpret_cast<T*>(shared_bytes);
  T* smem_v = smem_k + TileKV::kElements;
  T* smem_q = smem_v + TileKV::kElements;       // two stages
  T* smem_do = smem_q + 2 * TileQ::kElements;   // two stages

  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t h_kv = blockIdx.y, b = blockIdx.z;
  const int64_t group = p.heads / p.heads_kv;
  // Lengths and token offsets are per sequence; lse/delta rows per query head (below).
  const Sequence seq = sequence(p, b, h_kv * group);
  if (key0 >= seq.seqlen_k) return;  // packed batches launch for the longest sequence
  const int64_t seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  const T* k = row_pointer<const T>(p.k, p.k_strides, b, h_kv, seq.k_start);
  const T* v = row_pointer<const T>(p.v, p.v_strides, b, h_kv, seq.k_start);
  // Query blocks that can see these keys: all, or with causal masking those reaching key0.
  const int64_t q_begin = kCausal ? key0 / kBlockQ * kBlockQ : 0;
  const int q_blocks =
      q_begin < seqlen_q ? static_cast<int>((seqlen_q - q_begin + kBlockQ - 1) / kBlockQ) : 0;
  const int steps = static_cast<int>(group) * q_blocks;  // (query head, query block) pairs

  auto step_head = [&](int step) { return h_kv * group + step / q_blocks; };
  auto step_row0 = [&](int step) {
    return q_begin + static_cast<int64_t>(step % q_blocks) * kBlockQ;
  };
  auto load_q_do = [&](int stage, int step) {
    const int64_t h = step_head(step), q0 = step_row0(step);
    const T* q = row_pointer<const T>(p.q, p.q_strides, b, h, seq.q_start);
    const T* dout = row_pointer<const T>(p.grad_out, p.grad_out_strides, b, h, seq.q_start);
    load_rows<T, kBlockQ, kHeadDim>(smem_q + stage * TileQ::kElements, q, q0, seqlen_q,
                                    p.q_strides.seq, p.head_dim);
    load_rows<T, kBlockQ, kHeadDim>(smem_do + stage * TileQ::kElements, dout, q0, seqlen_q,
                                    p.grad_out_strides.seq, p.head_dim);
  };
  load_rows<T, kBlockN, kHeadDim>(smem_k, k, key0, seqlen_k, p.k_strides.seq, p.head_dim);
  load_rows<T, kBlockN, kHeadDim>(smem_v, v, key0, seqlen_k, p.v_strides.seq, p.head_dim);
  if (steps > 0) load_q_do(0, 0);
  cp_async_commit();

  const int lane = threadIdx.x % 32;
  const int warp_key0 = (threadIdx.x / 32) * 16;
  const int quad_col = 2 * (lane % 4);
  const int64_t keys[2] = {key0 + warp_key0 + lane / 4, key0 + warp_key0 + lane / 4 + 8};
  float acc_dk[kDk ? kDimTiles : 1][4] = {};
  float acc_dv[kDv ? kDimTiles : 1][4] = {};
  DropoutMask dropout{};
  if constexpr (kDropout) dropout = DropoutMask::of(p);

  for (int step = 0; step < steps; ++step) {
    cp_async_wait<0>();
    __syncthreads();
    if (step + 1 < steps) load_q_do((step + 1) % 2, step + 1);
    cp_async_commit();
    const T* sq = smem_q + (step % 2) * TileQ::kElements;
    const T* sdo = smem_do + (step % 2) * TileQ::kElements;
    const int64_t h = step_head(step), q0 = step_row0(step);
    const int64_t stats = b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start;
    const float* lse = p.lse + stats;
    const float* delta = p.delta + stats;

    // The dropout mask of this step's entries, bit 4 * ni + (half * 2 + e) for [ni][half *
    // 2 + e], drawn before the accumulators below are live (fewer registers at once).
    uint32_t kept = 0;
    if constexpr (kDropout) {
      kept = dropout.tile_bits_keys<kQueryTiles>(keys, q0 + quad_col, b * p.heads + h, lane);
    }

    // S^T = K Q^T (this warp's 16 keys x kBlockQ queries) and, for dK, dP^T = V dO^T.
    float pt[kQueryTiles][4] = {};
    float dpt[kDk ? kQueryTiles : 1][4] = {};
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      uint32_t frag_k[4], frag_v[4];
      load_fragment_a<TileKV>(frag_k, smem_k, warp_key0, kk * 16, lane);
      if constexpr (kDk) load_fragment_a<TileKV>(frag_v, smem_v, warp_key0, kk * 16, lane);
#pragma unroll
      for (int ni = 0; ni < kQueryTiles; ni += 2) {
        uint32_t regs[4];
        load_fragments_b_nk<TileQ>(regs, sq, ni * 8, kk * 16, lane);
        mma_16816<T>(pt[ni], frag_k, regs[0], regs[1]);
        mma_16816<T>(pt[ni + 1], frag_k, regs[2], regs[3]);
        if constexpr (kDk) {
          load_fragments_b_nk<TileQ>(regs, sdo, ni * 8, kk * 16, lane);
          mma_16816<T>(dpt[ni], frag_v, regs[0], regs[1]);
          mma_16816<T>(dpt[ni + 1], frag_v, regs[2], regs[3]);
        }
      }
    }

    // P^T from the saved statistics, and dS^T = P^T (dP^T - delta). Entries of queries past
    // the end, or (causal) of keys after their query, are 0. With dropout (keep z, r =
    // 1 / (1 - dropout_p), bit 4 * ni + i of kept), dV takes z r P^T and dS^T =
    // P^T (z r dP^T - delta).
#pragma unroll
    for (int ni = 0; ni < kQueryTiles; ++ni) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t query = q0 + ni * 8 + quad_col + e;
        float lse_log2, row_delta;
        const bool live = row_statistics(lse, delta, query, seqlen_q, lse_log2, row_delta);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = half * 2 + e;
          const bool visible =
              live && keys[half] < seqlen_k && (!kCausal || keys[half] <= query);
          float score = pt[ni][i] * p.scale_log2;
          if (visible && p.mask_kind != MaskKind::kNone) {
            score += mask_log2<T>(p, b, h, query, keys[half]);
          }
          const float prob = visible ? exp2f(score - lse_log2) : 0.0f;
          if constexpr (kDropout) {
            const bool keep = (kept >> (4 * ni + i)) & 1;
            pt[ni][i] = keep ? prob * p.dropout_scale : 0.0f;
            if constexpr (kDk) {
              dpt[ni][i] = prob * ((keep ? dpt[ni][i] * p.dropout_scale : 0.0f) - row_delta);
            }
          } else {
            pt[ni][i] = prob;
            if constexpr (kDk) dpt[ni][i] = prob * (dpt[ni][i] - row_delta);
          }
        }
      }
    }

    // dV += P^T dO and dK += dS^T Q: dO and Q tiles are [query][dim], B row-major.
#pragma unroll
    for (int kk = 0; kk < kBlockQ / 16; ++kk) {
      uint32_t frag_p[4], frag_ds[4];
      if constexpr (kDv) accumulators_to_fragment_a<T>(frag_p, pt[2 * kk], pt[2 * kk + 1]);
      if constexpr (kDk) accumulators_to_fragment_a<T>(frag_ds, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int di = 0; di < kDimTiles; di += 2) {
        uint32_t regs[4];
        if constexpr (kDv) {
          load_fragments_b_kn<TileQ>(regs, sdo, kk * 16, di * 8, lane);
          mma_16816<T>(acc_dv[di], frag_p, regs[0], regs[1]);
          mma_16816<T>(acc_dv[di + 1], frag_p, regs[2], regs[3]);
        }
        if constexpr (kDk) {
          load_fragments_b_kn<TileQ>(regs, sq, kk * 16, di * 8, lane);
          mma_16816<T>(acc_dk[di], frag_ds, regs[0], regs[1]);
          mma_16816<T>(acc_dk[di + 1], frag_ds, regs[2], regs[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // dK = scale * sum dS^T Q (the scores were scale * Q K^T); keys no query sees get zeros.
  T* dk = row_pointer<T>(p.dk, p.dk_strides, b, h_kv, seq.k_start);
  T* dv = row_pointer<T>(p.dv, p.dv_strides, b, h_kv, seq.k_start);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (keys[half] >= seqlen_k) continue;
    T* dk_row = dk + keys[half] * p.dk_strides.seq + quad_col;
    T* dv_row = dv + keys[half] * p.dv_strides.seq + quad_col;
#pragma unroll
    for (int di = 0; di < kDimTiles; ++di) {
      if (di * 8 >= p.head_dim) break;  // padding columns
      if constexpr (kDk) {
        *reinterpret_cast<uint32_t*>(dk_row + di * 8) = pack_pair<T>(
            acc_dk[di][half * 2] * p.scale, acc_dk[di][half * 2 + 1] * p.scale);
      }
      if constexpr (kDv) {
        *reinterpret_cast<uint32_t*>(dv_row + di * 8) =
            pack_pair<T>(acc_dv[di][half * 2], acc_dv[di][half * 2 + 1]);
      }
    }
  }
}

template <typename T, int kHeadDim, bool kCausal, bool kDropout>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttentionParams p) {
  constexpr int kStepN = kDqStepKeys<kHeadDim>;
  using TileQ = SwizzledTile<kBlockM, kHeadDim>;
  using TileKV = SwizzledTile<kStepN, kHeadDim>;
  constexpr int kSteps = kHeadDim / 16;
  constexpr int kKeyTiles = kStepN / 8;
  constexpr int kDimTiles = kHeadDim / 8;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* smem_q = reinterpret_cast<T*>(shared_bytes);
  T* smem_do = smem_q + TileQ::kElements;
  T* smem_k = smem_do + TileQ::kElements;       // two stages
  T* smem_v = smem_k + 2 * TileKV::kElements;   // two stages

  const int64_t row0 = query_block(kCausal);
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t h_kv = h / (p.heads / p.heads_kv);
  const Sequence seq = sequence(p, b, h);
  if (row0 >= seq.seqlen_q) return;  // packed batches launch for the longest sequence
  const int64_t seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  const T* q = row_pointer<const T>(p.q, p.q_strides, b, h, seq.q_start);
  const T* dout = row_pointer<const T>(p.grad_out, p.grad_out_strides, b, h, seq.q_start);
  const T* k = row_pointer<const T>(p.k, p.k_strides, b, h_kv, seq.k_start);
  const T* v = row_pointer<const T>(p.v, p.v_strides, b, h_kv, seq.k_start);
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
  load_rows<T, kBlockM, kHeadDim>(smem_do, dout, row0, seqlen_q, p.grad_out_strides.seq,
                                  p.head_dim);
  if (key_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const int lane = threadIdx.x % 32;
  const int warp_row0 = (threadIdx.x / 32) * 16;
  const int quad_col = 2 * (lane % 4);
  const int64_t rows[2] = {row0 + warp_row0 + lane / 4, row0 + warp_row0 + lane / 4 + 8};
  const float* lse = p.lse + seq.stats;
  const float* delta = p.delta + seq.stats;
  float lse_log2[2], row_delta[2];
  bool live[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    live[half] = row_statistics(lse, delta, rows[half], seqlen_q, lse_log2[half],
                                row_delta[half]);
  }
  float acc_dq[kDimTiles][4] = {};
  DropoutMask dropout{};
  if constexpr (kDropout) dropout = DropoutMask::of(p);

  for (int j = 0; j < key_blocks; ++j) {
    cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < key_blocks) load_kv((j + 1) % 2, j + 1);
    cp_async_commit();
    const T* sk = smem_k + (j % 2) * TileKV::kElements;
    const T* sv = smem_v + (j % 2) * TileKV::kElements;

    // The dropout mask of this block, bit 4 * ni + (half * 2 + e) for [ni][half * 2 + e],
    // drawn before the accumulators below are live (fewer registers at once).
    const int64_t key0 = static_cast<int64_t>(j) * kStepN;
    uint32_t kept = 0;
    if constexpr (kDropout) {
      kept = dropout.tile_bits_rows<kKeyTiles>(rows, key0 + quad_col, b * p.heads + h, lane);
    }

    // S = Q K^T and dP = dO V^T (this warp's 16 rows x kStepN keys).
    float s[kKeyTiles][4] = {};
    float dp[kKeyTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      uint32_t frag_q[4], frag_do[4];
      load_fragment_a<TileQ>(frag_q, smem_q, warp_row0, kk * 16, lane);
      load_fragment_a<TileQ>(frag_do, smem_do, warp_row0, kk * 16, lane);
#pragma unroll
      for (int ni = 0; ni < kKeyTiles; ni += 2) {
        uint32_t regs[4];
        load_fragments_b_nk<TileKV>(regs, sk, ni * 8, kk * 16, lane);
        mma_16816<T>(s[ni], frag_q, regs[0], regs[1]);
        mma_16816<T>(s[ni + 1], frag_q, regs[2], regs[3]);
        load_fragments_b_nk<TileKV>(regs, sv, ni * 8, kk * 16, lane);
        mma_16816<T>(dp[ni], frag_do, regs[0], regs[1]);
        mma_16816<T>(dp[ni + 1], frag_do, regs[2], regs[3]);
      }
    }

    // dS = P (dP - delta), P recomputed from the saved statistics; with dropout
    // dS = P (z r dP - delta).
#pragma unroll
    for (int ni = 0; ni < kKeyTiles; ++ni) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t key = key0 + ni * 8 + quad_col + e;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = half * 2 + e;
          const bool visible =
              live[half] && key < seqlen_k && (!kCausal || key <= rows[half]);
          float score = s[ni][i] * p.scale_log2;
          if (visible && p.mask_kind != MaskKind::kNone) {
            score += mask_log2<T>(p, b, h, rows[half], key);
          }
          const float prob = visible ? exp2f(score - lse_log2[half]) : 0.0f;
          float dprob = dp[ni][i];
          if constexpr (kDropout) {
            dprob = (kept >> (4 * ni + i)) & 1 ? dprob * p.dropout_scale : 0.0f;
          }
          dp[ni][i] = prob * (dprob - row_delta[half]);
          // dS is the gradient of the (natural-log) score, to which the mask was added: the
          // additive mask's gradient, summed over the dimensions it broadcasts.
          if (p.dmask != nullptr && visible) {
            atomicAdd(p.dmask + b * p.dmask_strides.batch + h * p.dmask_strides.head +
                          rows[half] * p.dmask_strides.row + key * p.dmask_strides.key,
                      dp[ni][i]);
          }
        }
      }
    }

    // dQ += dS K: K's [key][dim] tile is B row-major.
#pragma unroll
    for (int kk = 0; kk < kStepN / 16; ++kk) {
      uint32_t frag_ds[4];
      accumulators_to_fragment_a<T>(frag_ds, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int di = 0; di < kDimTiles; di += 2) {
        uint32_t regs[4];
        load_fragments_b_kn<TileKV>(regs, sk, kk * 16, di * 8, lane);
        mma_16816<T>(acc_dq[di], frag_ds, regs[0], regs[1]);
        mma_16816<T>(acc_dq[di + 1], frag_ds, regs[2], regs[3]);
      }
    }
  }
  cp_async_wait<0>();

  T* dq = row_pointer<T>(p.dq, p.dq_strides, b, h, seq.q_start);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (rows[half] >= seqlen_q) continue;
    T* dq_row = dq + rows[half] * p.dq_strides.seq + quad_col;
#pragma unroll
    for (int di = 0; di < kDimTiles; ++di) {
      if (di * 8 >= p.head_dim) break;  // padding columns
      *reinterpret_cast<uint32_t*>(dq_row + di * 8) = pack_pair<T>(
          acc_dq[di][half * 2] * p.scale, acc_dq[di][half * 2 + 1] * p.scale);
    }
  }
}

// The dK/dV kernel's grid: one block per kBlockN keys of each (batch, kv head).
inline dim3 dkdv_grid(const AttentionParams& p) {
  return dim3(static_cast<unsigned>((p.seqlen_k + kBlockN - 1) / kBlockN),
              static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
}

// The backward's kernels in the order they run, each handed to launch(kernel, grid,
// dynamic shared bytes), which returns whether it launched. launch_bwd below and the CPU
// emulator (tests/emulation/attention_emulated.cpp) both run this one plan.
template <typename T, int kHeadDim, bool kCausal, bool kDropout, typename Launch>
bool backward_plan(const AttentionParams& p, Launch&& launch) {
  // An empty grid is a launch error, so each kernel runs only when it has rows to write.
  if (p.seqlen_k > 0) {
    constexpr int kSmem = dkdv_smem_bytes<T, kHeadDim>();
    if constexpr (kDkdvTogether<kHeadDim>) {
      if (!launch(attention_bwd_dkdv_kernel<T, kHeadDim, kCausal, kDropout, true, true>,
                  dkdv_grid(p), kSmem)) {
        return false;
      }
    } else {
      if (!launch(attention_bwd_dkdv_kernel<T, kHeadDim, kCausal, kDropout, false, true>,
                  dkdv_grid(p), kSmem) ||  // dV
          !launch(attention_bwd_dkdv_kernel<T, kHeadDim, kCausal, kDropout, true, false>,
                  dkdv_grid(p), kSmem)) {  // dK
        return false;
      }
    }
  }
  if (p.seqlen_q == 0) return true;
  return launch(attention_bwd_dq_kernel<T, kHeadDim, kCausal, kDropout>, query_grid(p),
                dq_smem_bytes<T, kHeadDim>());
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernels itself
template <typename T, int kHeadDim, bool kCausal, bool kDropout>
cudaError_t launch_bwd(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  backward_plan<T, kHeadDim, kCausal, kDropout>(p, stream_launcher(p, stream, &err));
  return err;
}

template <typename T, int kHeadDim>
cudaError_t run_fwd(const AttentionParams& p, bool causal, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  if (p.dropout_seed != nullptr) {
    return causal ? launch_fwd<T, kHeadDim, true, true>(p, stream)
                  : launch_fwd<T, kHeadDim, false, true>(p, stream);
  }
  return causal ? launch_fwd<T, kHeadDim, true, false>(p, stream)
                : launch_fwd<T, kHeadDim, false, false>(p, stream);
}

template <typename T, int kHeadDim>
cudaError_t run_bwd(const AttentionParams& p, bool causal, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  if (p.dropout_seed != nullptr) {
    return causal ? launch_bwd<T, kHeadDim, true, true>(p, stream)
                  : launch_bwd<T, kHeadDim, false, true>(p, stream);
  }
  return causal ? launch_bwd<T, kHeadDim, true, false>(p, stream)
                : launch_bwd<T, kHeadDim, false, false>(p, stream);
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace attention_sm80
}  // namespace tilesmith

// Attention backward for Hopper (sm_90a) on wgmma, in two kernels (dK/dV, then dQ) like
// attention_bwd_sm80.cuh's, for the calls attention_fwd_sm90a.cuh takes (head dims up to
// 128 in kernels 64 or 128 wide, a mask or dropout). dQ, dK and dV are deterministic (no
// atomics); the additive mask's gradient is summed by the dQ kernel with fp32 atomics, as on
// sm_80. Both keep P, dS and their transposes in registers, where the score products'
// accumulators already lie in the A fragment layout of a register-A wgmma, and read every
// other operand from swizzled shared memory, filled by cp.async.
//
// dK/dV: one block of two warpgroups owns 128 keys of one (batch, kv head), 64 per
// warpgroup, with K and V resident in shared memory, and walks 64 queries at a time through
// every query head of its kv group, Q and dO double-buffered. Per step and warpgroup, with
// dS^T = P^T (dP^T - delta):
//   S^T = K Q^T and dP^T = V dO^T: wgmma m64n64k16, all four operands K-major (head dim
//     along the rows);
//   dV += P^T dO and dK += dS^T Q: P^T and dS^T from registers, dO and Q read N-major:
//     wgmma m64n128k16.
// dK and dV stay in registers (kHeadDim / 2 each a thread) and are written once.
//
// Not yet: overlap of a step's softmax with the tensor cores, TMA.
#pragma once

#include "attention_bwd_sm80.cuh"  // row_statistics
#include "attention_fwd_sm90a.cuh"

namespace tilesmith {
namespace attention_sm90a {

constexpr int kDkdvBlockQ = 64;  // queries per step of the dK/dV kernel
template <int kHeadDim>
constexpr int kQueryTileBytes = (kHeadDim / 64) * kDkdvBlockQ * kSwizzleRowBytes;  // 8, 16 KiB
// K and V (kTileRows keys each), two stages of Q and two of dO, and the alignment slack.
// With a mask, also the mask's share of each score of a step: a float per score,
// kDkdvBlockQ / 2 per thread.
constexpr int kMaskSlotBytes = kDkdvBlockQ / 2 * kThreads * 4;  // 32 KiB
template <int kHeadDim, bool kMasked = false>
constexpr int kDkdvSmemBytes = 2 * kTileBytes<kHeadDim> + 4 * kQueryTileBytes<kHeadDim> +
                               (kMasked ? kMaskSlotBytes : 0) + 1024;

// The two score-shaped products of a step, over the head dim, each A B^T with both operands
// K-major: this warpgroup's 64 rows of A (at a_tile and a2_tile, inside kTileRows-row tiles)
// by the kColumns rows of B (b_tile, b2_tile). Returns when both have retired.
template <typename T, int kHeadDim, int kColumns>
__device__ __forceinline__ void score_products(float (&acc)[kColumns / 2], uint32_t a_tile,
                                               uint32_t b_tile, float (&acc2)[kColumns / 2],
                                               uint32_t a2_tile, uint32_t b2_tile) {
#pragma unroll
  for (int i = 0; i < kColumns / 2; ++i) acc[i] = acc2[i] = 0.0f;
  // The zeros are written before the fence: left to itself nvcc may sink them between the
  // first product's wgmmas, and ptxas then serialises the products (warning C7519).
  fence_registers(acc);
  fence_registers(acc2);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    wgmma_m64nk16<kColumns, T, 0, 0>(acc, k_major_step(a_tile, kk),
                                     k_major_step<kColumns>(b_tile, kk), 1);
  }
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    wgmma_m64nk16<kColumns, T, 0, 0>(acc2, k_major_step(a2_tile, kk),
                                     k_major_step<kColumns>(b2_tile, kk), 1);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(acc);
  fence_registers(acc2);
}

template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dkdv_kernel(const AttentionParams p) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_k = aligned_shared(shared_bytes);
  uint8_t* smem_v = smem_k + kTileBytes<kHeadDim>;
  uint8_t* smem_q = smem_v + kTileBytes<kHeadDim>;           // two stages
  uint8_t* smem_do = smem_q + 2 * kQueryTileBytes<kHeadDim>;  // two stages

  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int64_t h_kv = blockIdx.y, b = blockIdx.z;
  const int64_t group = p.heads / p.heads_kv;
  // Lengths and token offsets are per sequence; lse/delta rows per query head (below).
  const Sequence seq = attention_sm80::sequence(p, b, h_kv * group);
  if (key0 >= seq.seqlen_k) return;  // packed batches launch for the longest sequence
  const int64_t seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  using attention_sm80::row_pointer;
  const T* k = row_pointer<const T>(p.k, p.k_strides, b, h_kv, seq.k_start);
  const T* v = row_pointer<const T>(p.v, p.v_strides, b, h_kv, seq.k_start);
  // Query blocks that can see these keys: all, or with causal masking those reaching key0.
  const int64_t q_begin = kCausal ? key0 / kDkdvBlockQ * kDkdvBlockQ : 0;
  const int q_blocks = q_begin < seqlen_q
      ? static_cast<int>((seqlen_q - q_begin + kDkdvBlockQ - 1) / kDkdvBlockQ) : 0;
  const int steps = static_cast<int>(group) * q_blocks;  // (query head, query block) pairs

  auto step_head = [&](int step) { return h_kv * group + step / q_blocks; };
  auto step_row0 = [&](int step) {
    return q_begin + static_cast<int64_t>(step % q_blocks) * kDkdvBlockQ;
  };
  auto load_q_do = [&](int stage, int step) {
    const int64_t h = step_head(step), q0 = step_row0(step);
    const T* q = row_pointer<const T>(p.q, p.q_strides, b, h, seq.q_start);
    const T* dout = row_pointer<const T>(p.grad_out, p.grad_out_strides, b, h, seq.q_start);
    load_rows<T, kDkdvBlockQ, kHeadDim>(smem_q + stage * kQueryTileBytes<kHeadDim>, q, q0,
                                        seqlen_q, p.q_strides.seq, p.head_dim);
    load_rows<T, kDkdvBlockQ, kHeadDim>(smem_do + stage * kQueryTileBytes<kHeadDim>, dout, q0,
                                        seqlen_q, p.grad_out_strides.seq, p.head_dim);
  };
  load_rows<T, kTileRows, kHeadDim>(smem_k, k, key0, seqlen_k, p.k_strides.seq, p.head_dim);
  load_rows<T, kTileRows, kHeadDim>(smem_v, v, key0, seqlen_k, p.v_strides.seq, p.head_dim);
  if (steps > 0) load_q_do(0, 0);
  cp_async_commit();

  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int quad_col = 2 * (lane % 4);
  // This thread's two keys: rows of every accumulator tile below.
  const int64_t warp_key0 = key0 + warpgroup * 64 + warp * 16;
  const int64_t keys[2] = {warp_key0 + lane / 4, warp_key0 + lane / 4 + 8};
  // This warpgroup's 64 keys of K and V: 64 rows into each column block.
  const uint32_t k_tile = shared_address(smem_k) + warpgroup * 64 * kSwizzleRowBytes;
  const uint32_t v_tile = shared_address(smem_v) + warpgroup * 64 * kSwizzleRowBytes;
  float acc_dk[kHeadDim / 2] = {};  // [4 di + 2 half + e]: key keys[half], column 8 di + ...
  float acc_dv[kHeadDim / 2] = {};

  // With a mask: its share (mask_log2, 0 outside the sequences) of this thread's scores of
  // a step, in shared-memory slots of its own (entry i at i * kThreads + threadIdx.x, in the
  // layout of pt below), filled for step s + 1 while the tensor cores run step s's dV and dK
  // products. Read from global memory inside the score loop instead, the loads' addresses
  // and values make the head dim 128 kernel spill.
  float* mask_slots = reinterpret_cast<float*>(smem_do + 2 * kQueryTileBytes<kHeadDim>);
  auto stage_mask = [&](int step) {
    const int64_t h = step_head(step), q0 = step_row0(step);
#pragma unroll
    for (int j = 0; j < kDkdvBlockQ / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t query = q0 + j * 8 + quad_col + e;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          mask_slots[(4 * j + 2 * half + e) * kThreads + threadIdx.x] =
              query < seqlen_q && keys[half] < seqlen_k
                  ? attention_sm80::mask_log2<T>(p, b, h, query, keys[half])
                  : 0.0f;
        }
      }
    }
  };
  if constexpr (kMasked) {
    if (steps > 0) stage_mask(0);
  }
  // Dropout: bit i of kept keeps entry i of pt below, drawn for step s + 1 while the tensor
  // cores run step s's dV and dK products.
  attention_sm80::DropoutMask dropout{};
  uint32_t kept = 0;
  auto draw_kept = [&](int step) {
    return dropout.tile_bits_keys<kDkdvBlockQ / 8>(keys, step_row0(step) + quad_col,
                                                   b * p.heads + step_head(step), lane);
  };
  if constexpr (kDropout) {
    dropout = attention_sm80::DropoutMask::of(p);
    if (steps > 0) kept = draw_kept(0);
  }

  for (int step = 0; step < steps; ++step) {
    cp_async_wait<0>();          // this step's Q and dO (and at step 0, K and V) have landed
    fence_proxy_async_shared();  // ... visible to wgmma's reads
    __syncthreads();  // for every thread; and no wgmma still reads the other stage
    if (step + 1 < steps) load_q_do((step + 1) % 2, step + 1);
    cp_async_commit();
    const uint32_t q_tile = shared_address(smem_q + (step % 2) * kQueryTileBytes<kHeadDim>);
    const uint32_t do_tile = shared_address(smem_do + (step % 2) * kQueryTileBytes<kHeadDim>);
    const int64_t h = step_head(step), q0 = step_row0(step);
    const int64_t stats = b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start;
    const float* lse = p.lse + stats;
    const float* delta = p.delta + stats;

    // S^T = K Q^T and dP^T = V dO^T: [4 j + 2 half + e] is key keys[half], query
    // q0 + 8 j + quad_col + e.
    float pt[kDkdvBlockQ / 2], dpt[kDkdvBlockQ / 2];
    score_products<T, kHeadDim, kDkdvBlockQ>(pt, k_tile, q_tile, dpt, v_tile, do_tile);

    // P^T from the saved statistics (and the mask), and dS^T = P^T (dP^T - delta). Entries
    // of queries past the end or with no visible key, of keys past the end, or (causal) of
    // keys after their query, are 0. With dropout (keep z, r = 1 / (1 - dropout_p)), dV
    // takes z r P^T and dS^T = P^T (z r dP^T - delta).
#pragma unroll
    for (int j = 0; j < kDkdvBlockQ / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t query = q0 + j * 8 + quad_col + e;
        float lse_log2, row_delta;
        const bool live =
            attention_sm80::row_statistics(lse, delta, query, seqlen_q, lse_log2, row_delta);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = 4 * j + 2 * half + e;
          const bool visible =
              live && keys[half] < seqlen_k && (!kCausal || keys[half] <= query);
          float score = pt[i] * p.scale_log2;
          if constexpr (kMasked) score += mask_slots[i * kThreads + threadIdx.x];
          const float prob = visible ? exp2f(score - lse_log2) : 0.0f;
          if constexpr (kDropout) {
            const bool keep = (kept >> i) & 1;
            pt[i] = keep ? prob * p.dropout_scale : 0.0f;
            dpt[i] = prob * ((keep ? dpt[i] * p.dropout_scale : 0.0f) - row_delta);
          } else {
            pt[i] = prob;
            dpt[i] = prob * (dpt[i] - row_delta);
          }
        }
      }
    }

    // dV += P^T dO and dK += dS^T Q, k-step kk over queries 16 kk .. 16 kk + 15.
    uint32_t frag_p[kDkdvBlockQ / 16][4], frag_ds[kDkdvBlockQ / 16][4];
    to_a_fragments<T, kDkdvBlockQ>(pt, frag_p);
    to_a_fragments<T, kDkdvBlockQ>(dpt, frag_ds);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDkdvBlockQ / 16; ++kk) {
      wgmma_m64nk16_a_registers<kHeadDim, T, 1>(acc_dv, frag_p[kk],
                                                n_major_step<kDkdvBlockQ>(do_tile, kk), 1);
    }
#pragma unroll
    for (int kk = 0; kk < kDkdvBlockQ / 16; ++kk) {
      wgmma_m64nk16_a_registers<kHeadDim, T, 1>(acc_dk, frag_ds[kk],
                                                n_major_step<kDkdvBlockQ>(q_tile, kk), 1);
    }
    wgmma_commit();
    if constexpr (kMasked) {
      if (step + 1 < steps) stage_mask(step + 1);  // this step's slots have been read
    }
    if constexpr (kDropout) {
      if (step + 1 < steps) kept = draw_kept(step + 1);
    }
    wgmma_wait<0>();  // this stage is refilled after the next step's barrier
  }
  fence_registers(acc_dk);
  fence_registers(acc_dv);
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  // dK = scale * sum dS^T Q (the scores were scale * Q K^T); keys no query sees get zeros.
  T* dk = row_pointer<T>(p.dk, p.dk_strides, b, h_kv, seq.k_start);
  T* dv = row_pointer<T>(p.dv, p.dv_strides, b, h_kv, seq.k_start);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (keys[half] >= seqlen_k) continue;
    store_row<kHeadDim>(dk + keys[half] * p.dk_strides.seq, acc_dk, half, p.scale, p.head_dim);
    store_row<kHeadDim>(dv + keys[half] * p.dv_strides.seq, acc_dv, half, 1.0f, p.head_dim);
  }
}

constexpr int kDqStepKeys = 64;  // keys per step of the dQ kernel
template <int kHeadDim>
constexpr int kKeyStepBytes = (kHeadDim / 64) * kDqStepKeys * kSwizzleRowBytes;  // 8, 16 KiB
// Q and dO (kTileRows rows each), two stages of K and two of V, and the alignment slack.
template <int kHeadDim>
constexpr int kDqSmemBytes = 2 * kTileBytes<kHeadDim> + 4 * kKeyStepBytes<kHeadDim> + 1024;

// dQ: one block of two warpgroups owns 128 query rows (64 per warpgroup) of one (batch,
// head), with Q and dO resident, and walks the keys 64 at a time like the forward. Per step
// and warpgroup: S = Q K^T and dP = dO V^T (wgmma m64n64k16 from shared memory, all
// K-major), dS = P (dP - delta), then dQ += dS K with dS from registers and K read N-major
// (m64n128k16).
template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(const AttentionParams p) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  uint8_t* smem_q = aligned_shared(shared_bytes);
  uint8_t* smem_do = smem_q + kTileBytes<kHeadDim>;
  uint8_t* smem_k = smem_do + kTileBytes<kHeadDim>;          // two stages
  uint8_t* smem_v = smem_k + 2 * kKeyStepBytes<kHeadDim>;    // two stages

  const int64_t row0 = attention_sm80::query_block<kBlockM>(kCausal);
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t h_kv = h / (p.heads / p.heads_kv);
  const Sequence seq = attention_sm80::sequence(p, b, h);
  if (row0 >= seq.seqlen_q) return;  // packed batches launch for the longest sequence
  const int64_t seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  using attention_sm80::row_pointer;
  const T* q = row_pointer<const T>(p.q, p.q_strides, b, h, seq.q_start);
  const T* dout = row_pointer<const T>(p.grad_out, p.grad_out_strides, b, h, seq.q_start);
  const T* k = row_pointer<const T>(p.k, p.k_strides, b, h_kv, seq.k_start);
  const T* v = row_pointer<const T>(p.v, p.v_strides, b, h_kv, seq.k_start);
  const int64_t key_end = kCausal && row0 + kBlockM < seqlen_k ? row0 + kBlockM : seqlen_k;
  const int key_blocks = static_cast<int>((key_end + kDqStepKeys - 1) / kDqStepKeys);

  auto load_kv = [&](int stage, int block) {
    const int64_t n0 = static_cast<int64_t>(block) * kDqStepKeys;
    load_rows<T, kDqStepKeys, kHeadDim>(smem_k + stage * kKeyStepBytes<kHeadDim>, k, n0,
                                        seqlen_k, p.k_strides.seq, p.head_dim);
    load_rows<T, kDqStepKeys, kHeadDim>(smem_v + stage * kKeyStepBytes<kHeadDim>, v, n0,
                                        seqlen_k, p.v_strides.seq, p.head_dim);
  };
  load_rows<T, kTileRows, kHeadDim>(smem_q, q, row0, seqlen_q, p.q_strides.seq, p.head_dim);
  load_rows<T, kTileRows, kHeadDim>(smem_do, dout, row0, seqlen_q, p.grad_out_strides.seq,
                                    p.head_dim);
  if (key_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int quad_col = 2 * (lane % 4);
  const int64_t warp_row0 = row0 + warpgroup * 64 + warp * 16;
  const int64_t rows[2] = {warp_row0 + lane / 4, warp_row0 + lane / 4 + 8};
  // This warpgroup's 64 rows of Q and dO: 64 rows into each column block.
  const uint32_t q_tile = shared_address(smem_q) + warpgroup * 64 * kSwizzleRowBytes;
  const uint32_t do_tile = shared_address(smem_do) + warpgroup * 64 * kSwizzleRowBytes;
  float lse_log2[2], row_delta[2];
  bool live[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    live[half] = attention_sm80::row_statistics(p.lse + seq.stats, p.delta + seq.stats,
                                                rows[half], seqlen_q, lse_log2[half],
                                                row_delta[half]);
  }
  float acc_dq[kHeadDim / 2] = {};  // [4 di + 2 half + e]: row rows[half], column 8 di + ...
  attention_sm80::DropoutMask dropout{};
  if constexpr (kDropout) dropout = attention_sm80::DropoutMask::of(p);

  for (int j = 0; j < key_blocks; ++j) {
    cp_async_wait<0>();          // K_j, V_j (and at j = 0, Q and dO) have landed
    fence_proxy_async_shared();  // ... visible to wgmma's reads
    __syncthreads();  // for every thread; and no wgmma still reads the other stage
    if (j + 1 < key_blocks) load_kv((j + 1) % 2, j + 1);
    cp_async_commit();
    const uint32_t k_tile = shared_address(smem_k + (j % 2) * kKeyStepBytes<kHeadDim>);
    const uint32_t v_tile = shared_address(smem_v + (j % 2) * kKeyStepBytes<kHeadDim>);
    const int64_t key0 = static_cast<int64_t>(j) * kDqStepKeys;

    // Dropout: bit i of kept keeps entry i of s below, drawn before S is live.
    uint32_t kept = 0;
    if constexpr (kDropout) {
      kept = dropout.tile_bits_rows<kDqStepKeys / 8>(rows, key0 + quad_col, b * p.heads + h,
                                                     lane);
    }

    // S = Q K^T and dP = dO V^T: [4 ni + 2 half + e] is row rows[half], key
    // key0 + 8 ni + quad_col + e.
    float s[kDqStepKeys / 2], dp[kDqStepKeys / 2];
    score_products<T, kHeadDim, kDqStepKeys>(s, q_tile, k_tile, dp, do_tile, v_tile);

    // dS = P (dP - delta), P recomputed from the saved statistics (and the mask); 0 where P
    // is. With dropout dS = P (z r dP - delta).
#pragma unroll
    for (int ni = 0; ni < kDqStepKeys / 8; ++ni) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t key = key0 + ni * 8 + quad_col + e;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = 4 * ni + 2 * half + e;
          const bool visible = live[half] && key < seqlen_k && (!kCausal || key <= rows[half]);
          float score = s[i] * p.scale_log2;
          if constexpr (kMasked) {
            if (visible) score += attention_sm80::mask_log2<T>(p, b, h, rows[half], key);
          }
          const float prob = visible ? exp2f(score - lse_log2[half]) : 0.0f;
          float dprob = dp[i];
          if constexpr (kDropout) dprob = (kept >> i) & 1 ? dprob * p.dropout_scale : 0.0f;
          dp[i] = prob * (dprob - row_delta[half]);
          if constexpr (kMasked) {
            // dS is the gradient of the score the mask was added to: the additive mask's
            // gradient, summed over the dimensions it broadcasts.
            if (p.dmask != nullptr && visible) {
              atomicAdd(p.dmask + b * p.dmask_strides.batch + h * p.dmask_strides.head +
                            rows[half] * p.dmask_strides.row + key * p.dmask_strides.key,
                        dp[i]);
            }
          }
        }
      }
    }

    // dQ += dS K, k-step kk over keys 16 kk .. 16 kk + 15.
    uint32_t frag_ds[kDqStepKeys / 16][4];
    to_a_fragments<T, kDqStepKeys>(dp, frag_ds);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDqStepKeys / 16; ++kk) {
      wgmma_m64nk16_a_registers<kHeadDim, T, 1>(acc_dq, frag_ds[kk],
                                                n_major_step<kDqStepKeys>(k_tile, kk), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();  // this stage is refilled after the next step's barrier
  }
  fence_registers(acc_dq);
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  T* dq = row_pointer<T>(p.dq, p.dq_strides, b, h, seq.q_start);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (rows[half] < seqlen_q) {
      store_row<kHeadDim>(dq + rows[half] * p.dq_strides.seq, acc_dq, half, p.scale, p.head_dim);
    }
  }
}

// The backward's kernels in the order they run, each handed to launch(kernel, grid, threads,
// dynamic shared bytes), which returns whether it launched: the launcher below and the CPU
// emulator (tests/emulation/attention_sm90a_emulated.cpp) both run this one plan.
template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout,
          typename Launch>
bool backward_plan(const AttentionParams& p, Launch&& launch) {
  // An empty grid is a launch error, so each kernel runs only when it has rows to write.
  if (p.seqlen_k > 0) {
    const dim3 grid(static_cast<unsigned>((p.seqlen_k + kBlockN - 1) / kBlockN),
                    static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
    if (!launch(attention_bwd_dkdv_kernel<T, kHeadDim, kCausal, kMasked, kDropout>, grid,
                kThreads, kDkdvSmemBytes<kHeadDim, kMasked>)) {
      return false;
    }
  }
  if (p.seqlen_q == 0) return true;
  return launch(attention_bwd_dq_kernel<T, kHeadDim, kCausal, kMasked, kDropout>,
                attention_sm80::query_grid<kBlockM>(p), kThreads, kDqSmemBytes<kHeadDim>);
}

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches the kernels itself
template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
cudaError_t launch_bwd(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  auto launch = [&](auto kernel, dim3 grid, int threads, int smem) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return false;
    kernel<<<grid, threads, smem, stream>>>(p);
    err = cudaGetLastError();
    return err == cudaSuccess;
  };
  backward_plan<T, kHeadDim, kCausal, kMasked, kDropout>(p, launch);
  return err;
}

template <typename T>
cudaError_t run_bwd(const AttentionParams& p, bool causal, cudaStream_t stream) {
  if (!takes(p)) return cudaErrorNotSupported;
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  return with_variant(p, causal, [&](auto width, auto is_causal, auto masked, auto dropout) {
    return launch_bwd<T, decltype(width)::value, decltype(is_causal)::value,
                      decltype(masked)::value, decltype(dropout)::value>(p, stream);
  });
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace attention_sm90a
}  // namespace tilesmith

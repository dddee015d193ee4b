// Dropout of the attention probabilities, the same mask as the Triton kernels'
// (kernels/attention_fwd.py, dropout_keep; written out by ops.attention_dropout_mask):
// probability (row, key) of stream (batch * heads + query head) is kept when word key % 4
// of Philox4x32-10 (Salmon et al., SC'11), keyed by the seed's (low, high) 32-bit halves,
// at counter (key / 4, row, stream, 0), is >= threshold = dropout_p * 2^32. The mask is a
// function of (seed, stream, row, key) only, so every kernel, whatever its tiles,
// regenerates it.
//
// One Philox call yields the words of 4 neighbouring keys. In an mma accumulator tile a
// thread holds 2 neighbouring keys of 2 rows (rows x keys: forward, dQ) or 2 queries of 2
// keys 8 apart (keys x queries: dK/dV), so the threads that share a call compute one each
// and trade words through shuffles: one call per thread per 8 x 16 tile, none repeated.
#pragma once

#include <cstdint>

#include "attention.h"

namespace tilesmith {
namespace attention_sm80 {

struct Philox4 {
  uint32_t w[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                 uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    // One 32 x 32 -> 64-bit multiply gives both halves (IMAD.WIDE.U32).
    const uint64_t b_c2 = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t a_c0 = static_cast<uint64_t>(kRoundA) * c0;
    c0 = static_cast<uint32_t>(b_c2 >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(a_c0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b_c2);
    c3 = static_cast<uint32_t>(a_c0);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {{c0, c1, c2, c3}};
}

__device__ __forceinline__ uint32_t pick(const Philox4& r, int index) {
  return index & 2 ? (index & 1 ? r.w[3] : r.w[2]) : (index & 1 ? r.w[1] : r.w[0]);
}

// One kernel's view of the mask: the key and threshold, read once.
struct DropoutMask {
  uint32_t key_low, key_high, threshold;

  __device__ __forceinline__ static DropoutMask of(const AttentionParams& p) {
    const uint64_t seed = static_cast<uint64_t>(*p.dropout_seed);
    return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), p.dropout_threshold};
  }

  __device__ __forceinline__ Philox4 words(int64_t key, int64_t row, int64_t stream) const {
    const uint32_t group = static_cast<uint32_t>(static_cast<uint64_t>(key) >> 2);  // key / 4
    return philox4x32_10(group, static_cast<uint32_t>(row), static_cast<uint32_t>(stream), 0u,
                         key_low, key_high);
  }

  __device__ __forceinline__ uint32_t kept(uint32_t word) const { return word >= threshold; }

  // Rows x keys accumulator tile (forward, dQ): this thread holds keys key, key + 1 (key a
  // multiple of 2) of rows[0] and rows[1]. Returns bit (half * 2 + e) set when (rows[half],
  // key + e) is kept: the accumulator index of that entry. Lanes 2i and 2i + 1 share the
  // two calls (same rows, same key group) and each makes one. All 32 lanes must call.
  __device__ __forceinline__ uint32_t keep_bits_rows(const int64_t (&rows)[2], int64_t key,
                                                     int64_t stream, int lane) const {
    const int odd = lane & 1;  // this lane's call: rows[odd]; its keys: words 2 * odd, + 1
    const Philox4 r = words(key, odd ? rows[1] : rows[0], stream);
    // (Selects, not r.w[2 * odd]: a runtime index would put r in local memory.)
    const uint32_t own0 = odd ? r.w[2] : r.w[0], own1 = odd ? r.w[3] : r.w[1];
    // The partner needs the other pair of words of this lane's row.
    const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? r.w[0] : r.w[2], 1);
    const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? r.w[1] : r.w[3], 1);
    const uint32_t own = kept(own0) | kept(own1) << 1;
    const uint32_t other = kept(got0) | kept(got1) << 1;
    return odd ? (other | own << 2) : (own | other << 2);
  }

  // Keys x queries accumulator tile (dK/dV): this thread holds keys[0], keys[1] (8 apart)
  // and queries query, query + 1. Returns bit (half * 2 + e) set when (query + e, keys[half])
  // is kept. The four lanes 4 apart (lane bits 2-3: keys 4g .. 4g + 3 of one key group) need
  // word j of the same four calls, one per (half, e): lane j makes call j, and a 4 x 4
  // transpose through three xor shuffles hands each lane its words. All 32 lanes must call.
  __device__ __forceinline__ uint32_t keep_bits_keys(const int64_t (&keys)[2], int64_t query,
                                                     int64_t stream, int lane) const {
    const int j = (lane >> 2) & 3;
    const int half = j >> 1, e = j & 1;
    const Philox4 r = words(half ? keys[1] : keys[0], query + e, stream);
    uint32_t bits = kept(pick(r, j)) << j;
#pragma unroll
    for (int step = 1; step < 4; ++step) {
      // The lane j ^ step made call j ^ step and needs word j ^ step of this lane's call.
      const uint32_t got = __shfl_xor_sync(0xffffffffu, pick(r, j ^ step), step << 2);
      bits |= kept(got) << (j ^ step);
    }
    return bits;
  }

  // The bits of kTiles 8-wide tiles side by side (keys, or queries, first + 8 ni), bit
  // 4 ni + (half * 2 + e) for accumulator entry [ni][half * 2 + e]: one word per block step.
  template <int kTiles>
  __device__ __forceinline__ uint32_t tile_bits_rows(const int64_t (&rows)[2], int64_t first_key,
                                                     int64_t stream, int lane) const {
    static_assert(kTiles <= 8, "4 bits per tile in one 32-bit word");
    uint32_t bits = 0;
#pragma unroll
    for (int ni = 0; ni < kTiles; ++ni) {
      bits |= keep_bits_rows(rows, first_key + ni * 8, stream, lane) << (4 * ni);
    }
    return bits;
  }

  template <int kTiles>
  __device__ __forceinline__ uint32_t tile_bits_keys(const int64_t (&keys)[2],
                                                     int64_t first_query, int64_t stream,
                                                     int lane) const {
    static_assert(kTiles <= 8, "4 bits per tile in one 32-bit word");
    uint32_t bits = 0;
#pragma unroll
    for (int ni = 0; ni < kTiles; ++ni) {
      bits |= keep_bits_keys(keys, first_query + ni * 8, stream, lane) << (4 * ni);
    }
    return bits;
  }
};

}  // namespace attention_sm80
}  // namespace tilesmith

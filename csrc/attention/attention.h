// The plain interface between attention_api.cpp (which sees ATen) and the kernel files.
// Tensors are (batch, heads, seq, head_dim) with a unit stride along head_dim; the other
// strides are in elements, so transposed (B, S, H, D) layouts are read in place.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace tilesmith {

struct AttentionStrides {
  int64_t batch, head, seq;
};

// Strides of a (batch, heads, seq_q, seq_k) mask; 0 where it broadcasts.
struct MaskStrides {
  int64_t batch, head, row, key;
};

// kAdditive: in q's dtype; kAdditiveFloat32: fp32 beside fp16/bf16 queries, read as it is
// (cast to q's dtype, a bias of a few hundred would lose its fractions, and fp16 would make
// -1e5 -inf), as PyTorch's SDPA adds it.
enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2, kAdditiveFloat32 = 3 };

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // natural log-sum-exp of each query row, fp32
  AttentionStrides q_strides, k_strides, v_strides, out_strides;
  // Row r of sequence b, head h in lse (and delta): b * lse_batch_stride + h *
  // lse_head_stride + first token + r. Dense: (batch, heads, seq_q); packed: (heads, tokens).
  int64_t lse_batch_stride, lse_head_stride;
  int64_t batch, heads, heads_kv;
  int64_t seqlen_q, seqlen_k;  // dense: the lengths; packed: the longest (the grid's extent)
  // Of q, k and v alike: a multiple of 8 up to the kernel's head dim (64, 128 or 256); the
  // kernels zero-fill the columns in between.
  int64_t head_dim;
  // Packed variable-length batches (varlen_attention): sequence b owns tokens cu_seqlens[b]
  // to cu_seqlens[b + 1] of (tokens, heads, dim) tensors, batch strides 0. Dense: nullptr.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  // Packed: the tokens of q (and out), and of k and v: the rows the TMA's tile maps span.
  int64_t tokens_q = 0, tokens_k = 0;
  float scale_log2;  // softmax scale * log2(e): the kernels exponentiate with exp2
  float scale;

  // Optional mask (dense batches only): bool (1 byte, nonzero keeps the score) or additive
  // (q's dtype or fp32, added to the scaled scores), broadcast through zero strides.
  const void* mask = nullptr;
  MaskKind mask_kind = MaskKind::kNone;
  MaskStrides mask_strides{};
  // Backward: the additive mask's gradient, fp32 in the mask's own (broadcast) shape,
  // accumulated with atomics (zero strides where it broadcasts); nullptr when not wanted.
  float* dmask = nullptr;
  MaskStrides dmask_strides{};

  // Dropout of the probabilities (dropout_sm80.cuh): Philox keyed by *dropout_seed, an int64
  // on the device (drawn per call from torch's generator without a host sync); a
  // probability is kept when its 32-bit word is >= dropout_threshold, and the kept ones are
  // scaled by dropout_scale = 1 / (1 - dropout_p). nullptr: no dropout.
  const int64_t* dropout_seed = nullptr;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.0f;

  // Split over the keys (flash-decoding), forward only, for calls whose query blocks are too
  // few to fill the GPU: with keys_per_split > 0 (a multiple of 64), block (query block,
  // split s) of the sm80 forward takes keys s * keys_per_split onwards and writes an fp32
  // output normalised by its own sum, and its log-sum-exp, for lse row r (the index lse
  // uses, above): o_partial[(s * lse_rows + r) * head_dim + c], lse_partial[s * lse_rows + r];
  // attention_split_combine_kernel then weighs the splits into out and lse. 0: no split.
  int64_t keys_per_split = 0;
  float* o_partial = nullptr;
  float* lse_partial = nullptr;

  // Backward only. delta = rowsum(grad_out * out), laid out like lse.
  const void* grad_out = nullptr;
  const float* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;  // (batch, heads_kv, seqlen_k, head_dim): summed over each kv group
  void* dv = nullptr;
  AttentionStrides grad_out_strides{}, dq_strides{}, dk_strides{}, dv_strides{};
};

// The forward's splits over the keys (1: no split), and the rows of lse (and of each split's
// partials): dense batch * heads * seqlen_q, packed heads * tokens.
__host__ __device__ inline int64_t key_splits(const AttentionParams& p) {
  return p.keys_per_split > 0 && p.seqlen_k > p.keys_per_split
             ? (p.seqlen_k + p.keys_per_split - 1) / p.keys_per_split
             : 1;
}
__host__ __device__ inline int64_t lse_rows(const AttentionParams& p) {
  return p.cu_seqlens_q != nullptr ? p.heads * p.tokens_q : p.batch * p.heads * p.seqlen_q;
}

// One file per (dtype, head dim): csrc/attention/attention_sm80_<dtype>_d<D>.cu.
#define TILESMITH_ATTENTION_DECLARE(dtype, head_dim)                                      \
  cudaError_t run_attention_fwd_sm80_##dtype##_d##head_dim(const AttentionParams& params, \
                                                           bool causal, cudaStream_t stream); \
  cudaError_t run_attention_bwd_sm80_##dtype##_d##head_dim(const AttentionParams& params, \
                                                           bool causal, cudaStream_t stream);
TILESMITH_ATTENTION_DECLARE(bf16, 64)
TILESMITH_ATTENTION_DECLARE(bf16, 128)
TILESMITH_ATTENTION_DECLARE(fp16, 64)
TILESMITH_ATTENTION_DECLARE(fp16, 128)
TILESMITH_ATTENTION_DECLARE(bf16, 256)
TILESMITH_ATTENTION_DECLARE(fp16, 256)
#undef TILESMITH_ATTENTION_DECLARE

// The forward and the backward on wgmma (attention_fwd_sm90a.cuh, attention_bwd_sm90a.cuh),
// in tilesmith._C_sm90a (see common/hopper_kernels.h): head dims up to 128, a mask or
// dropout but not both.
cudaError_t run_attention_fwd_sm90a_bf16(const AttentionParams& params, bool causal,
                                         cudaStream_t stream);
cudaError_t run_attention_fwd_sm90a_fp16(const AttentionParams& params, bool causal,
                                         cudaStream_t stream);
cudaError_t run_attention_bwd_sm90a_bf16(const AttentionParams& params, bool causal,
                                         cudaStream_t stream);
cudaError_t run_attention_bwd_sm90a_fp16(const AttentionParams& params, bool causal,
                                         cudaStream_t stream);

// The most dynamic shared memory one block of the kernels for head dim 256 asks for (the
// same for both dtypes): more than some GPUs (sm_86, sm_89: 99 KiB) allow.
int attention_sm80_d256_smem_bytes();

}  // namespace tilesmith

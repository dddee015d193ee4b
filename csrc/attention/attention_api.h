#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace tilesmith {

// Dense attention on (batch, heads, seq, head_dim) fp16/bf16 CUDA tensors, head_dim a
// multiple of 8 up to 256, the same for q, k and v (run by the narrowest of the kernels 64,
// 128 and 256 wide that holds it); k and v may have fewer heads (grouped-query attention).
// Causal masking is aligned top-left. mask: a (batch, heads, seq_q, seq_k) view whose
// dimensions are 1 or full, bool (True keeps) or additive in q's dtype. Returns (out, lse),
// lse float32 (batch, heads, seq_q), -inf for a row that sees no key (its output is 0).
// dropout_p > 0 drops probabilities with the Philox mask of `seed` (a 1-element int64 CUDA
// tensor; the same seed in the backward regenerates the mask), as the Triton kernels do.
// keys_per_split > 0 (a multiple of 64) splits the keys over that many blocks per query
// block (flash-decoding; the sm80 kernel only), 0 does not.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask,
                                                      bool causal, double scale, double dropout_p,
                                                      const std::optional<at::Tensor>& seed,
                                                      int64_t keys_per_split);

// (dq, dk, dv, dmask) from the forward's inputs, output and lse; dmask (fp32, the mask's
// shape) only with mask_grad, else empty. grad_lse: the gradient of lse, where the caller
// took one (lse's shape).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
    bool causal, double scale, bool mask_grad, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& grad_lse);

// The same on packed (tokens, heads, head_dim) tensors, sequence b owning tokens
// cu_seqlens[b] .. cu_seqlens[b + 1] (int32, on the device; max_seqlen_* at least the longest).
// lse is (heads, tokens_q), and so is the backward's optional grad_lse.
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, int64_t keys_per_split);

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& grad_lse);

}  // namespace tilesmith

#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace tilesmith {

// Dense attention on (batch, heads, seq, head_dim) fp16/bf16 CUDA tensors, head_dim 64 or
// 128 (the same for q, k and v); k and v may have fewer heads (grouped-query attention).
// Causal masking is aligned top-left. Returns (out, lse), lse float32 (batch, heads, seq_q).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, bool causal,
                                                      double scale);

// (dq, dk, dv) from the forward's inputs, output and lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale);

}  // namespace tilesmith

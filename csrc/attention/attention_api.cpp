// tilesmith::attention_fwd_cuda / attention_bwd_cuda: checks, operand layouts, outputs and the
// AttentionParams fill. The schemas live in python/tilesmith/ops/attention.py;
// registration.cpp binds these functions to them for CUDA tensors.
#include "attention_api.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/check.h"
#include "../common/hopper_kernels.h"
#include "../matmul/matmul_api.h"
#include "attention.h"

namespace tilesmith {

namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "attention (cuda backend): ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == q.device(), "attention: ", name, " is on ", t.device(), ", query on ",
              q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "attention: ", name, " has dtype ",
              t.scalar_type(), ", query ", q.scalar_type());
  TORCH_CHECK(t.dim() == 4, "attention: ", name, " must be 4-D (batch, heads, seq, head_dim), got ",
              t.sizes());
}

// The kernels read every row with 16-byte cp.async: unit stride along head_dim, the other
// strides multiples of 8 elements, a 16-byte aligned start. Views that are not get copied.
at::Tensor vector_readable(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ok) return t;
  return t.is_contiguous() ? t.clone() : t.contiguous();  // clone: a misaligned start
}

AttentionStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

using Runner = cudaError_t (*)(const AttentionParams&, bool, cudaStream_t);

// The kernels of the narrowest head dim (64, 128 or 256) that holds `head_dim`.
Runner pick_runner(at::ScalarType dtype, int64_t head_dim, bool backward) {
  const bool bf16 = dtype == at::kBFloat16;
  if (head_dim <= 64) {
    if (backward) return bf16 ? run_attention_bwd_sm80_bf16_d64 : run_attention_bwd_sm80_fp16_d64;
    return bf16 ? run_attention_fwd_sm80_bf16_d64 : run_attention_fwd_sm80_fp16_d64;
  }
  if (head_dim <= 128) {
    if (backward) {
      return bf16 ? run_attention_bwd_sm80_bf16_d128 : run_attention_bwd_sm80_fp16_d128;
    }
    return bf16 ? run_attention_fwd_sm80_bf16_d128 : run_attention_fwd_sm80_fp16_d128;
  }
  if (backward) return bf16 ? run_attention_bwd_sm80_bf16_d256 : run_attention_bwd_sm80_fp16_d256;
  return bf16 ? run_attention_fwd_sm80_bf16_d256 : run_attention_fwd_sm80_fp16_d256;
}

// Shape and dtype checks shared by the forward and the backward.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_operand(q, "query", q);
  check_operand(k, "key", q);
  check_operand(v, "value", q);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "attention (cuda backend): dtype must be float16 or bfloat16, got ", q.scalar_type());
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim > 0 && head_dim <= 256 && head_dim % 8 == 0 && k.size(3) == head_dim &&
                  v.size(3) == head_dim,
              "attention (cuda backend): query, key and value head dims must be equal, a "
              "multiple of 8 and at most 256, got query ", q.sizes(), ", key ", k.sizes(),
              ", value ", v.sizes());
  if (head_dim > 128) {
    const int needed = attention_sm80_d256_smem_bytes();
    int allowed = 0, major = 0, minor = 0;
    const int device = q.device().index();
    TILESMITH_CHECK_LAUNCH(
        cudaDeviceGetAttribute(&allowed, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TILESMITH_CHECK_LAUNCH(
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    TILESMITH_CHECK_LAUNCH(
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    TORCH_CHECK(needed <= allowed, "attention (cuda backend): head dims above 128 need ",
                needed / 1024, " KiB of shared memory per block; this GPU (compute capability ",
                major, ".", minor, ") allows ", allowed / 1024,
                " KiB. The triton backend runs them.");
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention: batch sizes differ: ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2),
              "attention: key and value shapes differ: ", k.sizes(), " and ", v.sizes());
  // No heads at all is an empty call, as in PyTorch's SDPA (the runners launch nothing).
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0,
              "attention: query heads (", q.size(1), ") must be a multiple of key/value heads (",
              k.size(1), ")");
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535,
              "attention (cuda backend): batch and heads must each be at most 65535, got ",
              q.sizes());
}

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale) {
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.heads_kv = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.lse_batch_stride = q.size(1) * q.size(2);  // lse and delta: contiguous (batch, heads, seq)
  p.lse_head_stride = q.size(2);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  return p;
}

// The forward's or the backward's kernels: on Hopper the wgmma ones where they take the
// call (attention_fwd_sm90a.cuh's takes), else those of pick_runner.
void launch(const AttentionParams& p, bool causal, const at::Tensor& q, bool backward) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const HopperKernels* hopper = hopper_kernels();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  cudaError_t error = cudaSuccess;
  if (hopper != nullptr &&
      (backward ? hopper->attention_bwd : hopper->attention_fwd)(p, causal, bf16, stream,
                                                                 &error)) {
    TILESMITH_CHECK_LAUNCH(error);
    return;
  }
  TILESMITH_CHECK_LAUNCH(pick_runner(q.scalar_type(), q.size(3), backward)(p, causal, stream));
}

// A packed (tokens, heads, dim) tensor seen as a batch of one (1, heads, tokens, dim): the
// dense checks and layouts then apply as they are.
at::Tensor as_dense(const at::Tensor& packed, const char* name) {
  TORCH_CHECK(packed.dim() == 3, "varlen_attention: ", name,
              " must be 3-D (tokens, heads, head_dim), got ", packed.sizes());
  return packed.transpose(0, 1).unsqueeze(0);
}

// Packed batches: sequence b owns tokens cu_seqlens[b] .. cu_seqlens[b + 1]; the kernels
// read the bounds on the device (no host sync), launch for the longest sequences and let
// the blocks past a sequence's end return at once.
struct Packing {
  const at::Tensor& cu_seqlens_q;
  const at::Tensor& cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;

  void check(const at::Tensor& q) const {
    for (const at::Tensor* cu : {&cu_seqlens_q, &cu_seqlens_k}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() &&
                      cu->device() == q.device(),
                  "varlen_attention: cu_seqlens must be contiguous 1-D int32 tensors on ",
                  q.device(), ", got ", cu->scalar_type(), " ", cu->sizes(), " on ",
                  cu->device());
    }
    TORCH_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0) && cu_seqlens_q.size(0) >= 1 &&
                    cu_seqlens_q.size(0) - 1 <= 65535,
                "varlen_attention: cu_seqlens_q and cu_seqlens_k need batch + 1 entries (batch "
                "at most 65535), got ", cu_seqlens_q.sizes(), " and ", cu_seqlens_k.sizes());
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0,
                "varlen_attention: max_seqlen_q and max_seqlen_k must be >= 0");
  }

  // On make_params' view of the packed tensors, whose seqlen_q and seqlen_k are the tokens.
  void apply(AttentionParams& p) const {
    p.batch = cu_seqlens_q.size(0) - 1;
    p.tokens_q = p.seqlen_q;
    p.tokens_k = p.seqlen_k;
    for (AttentionStrides* s : {&p.q_strides, &p.k_strides, &p.v_strides, &p.out_strides,
                                &p.grad_out_strides, &p.dq_strides, &p.dk_strides,
                                &p.dv_strides}) {
      s->batch = 0;
    }
    p.seqlen_q = max_seqlen_q;
    p.seqlen_k = max_seqlen_k;
    p.lse_batch_stride = 0;  // lse and delta: (heads, tokens)
    p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  }
};

// Strides of a 4-D view, 0 along the dimensions of size 1 (which broadcast).
MaskStrides broadcast_strides(const at::Tensor& t) {
  auto stride = [&](int i) { return t.size(i) == 1 ? int64_t{0} : t.stride(i); };
  return {stride(0), stride(1), stride(2), stride(3)};
}

// A (batch, heads, seq_q, seq_k) mask whose dimensions are 1 or full (ops/attention.py's
// _prepare_mask makes that view): bool, or additive in q's dtype or fp32.
void set_mask(AttentionParams& p, const std::optional<at::Tensor>& mask, const at::Tensor& q,
              const at::Tensor& k) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  const at::ScalarType type = m.scalar_type();
  TORCH_CHECK(m.dim() == 4 && m.device() == q.device() &&
                  (type == at::kBool || type == q.scalar_type() || type == at::kFloat),
              "attention: attn_mask must be a 4-D bool, ", q.scalar_type(), " or float32 ",
              "tensor on ", q.device(), ", got ", type, " ", m.sizes(), " on ", m.device());
  const int64_t full[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(m.size(i) == 1 || m.size(i) == full[i], "attention: attn_mask ", m.sizes(),
                " does not broadcast to (batch, heads, seq_q, seq_k) = (", full[0], ", ",
                full[1], ", ", full[2], ", ", full[3], ")");
  }
  p.mask = m.data_ptr();
  // q is fp16 or bf16 (check_inputs), so an fp32 mask is never in q's dtype.
  p.mask_kind = type == at::kBool    ? MaskKind::kBool
                : type == at::kFloat ? MaskKind::kAdditiveFloat32
                                     : MaskKind::kAdditive;
  p.mask_strides = broadcast_strides(m);
}

// The call's dropout (dropout_sm80.cuh): seed is ops/attention.py's draw_dropout_seed, a
// 1-element int64 tensor on the device that the kernels read themselves.
struct Dropout {
  double p;
  const std::optional<at::Tensor>& seed;

  void apply(AttentionParams& params, const at::Tensor& q) const {
    TORCH_CHECK(p >= 0.0 && p < 1.0, "attention: dropout_p must be in [0, 1), got ", p);
    if (p == 0.0) return;
    TORCH_CHECK(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1 &&
                    seed->device() == q.device(),
                "attention: dropout_p > 0 needs seed: a 1-element int64 tensor on ", q.device(),
                ", got ",
                seed.has_value()
                    ? c10::str(seed->scalar_type(), " ", seed->sizes(), " on ", seed->device())
                    : std::string("None"));
    params.dropout_seed = seed->data_ptr<int64_t>();
    // round(p * 2^32), half to even as Python's round (ops/attention.py's _dropout_args).
    params.dropout_threshold =
        static_cast<uint32_t>(std::min(std::nearbyint(p * 4294967296.0), 4294967295.0));
    params.dropout_scale = static_cast<float>(1.0 / (1.0 - p));
  }
};

// Split over the keys (flash-decoding, attention_fwd_sm80.cuh): keys_per_split keys per
// split (0: none; ops/attention.py's _keys_per_split decides), each split's fp32 partials
// in the returned tensors, which must live until the kernels are queued.
std::tuple<at::Tensor, at::Tensor> split_keys(AttentionParams& p, int64_t keys_per_split,
                                              const at::Tensor& q) {
  TORCH_CHECK(keys_per_split >= 0 && keys_per_split % 64 == 0,
              "attention (cuda backend): keys_per_split must be a multiple of 64 (0: no "
              "split), got ", keys_per_split);
  p.keys_per_split = keys_per_split;
  const int64_t splits = key_splits(p);
  if (splits == 1) return {};
  const int64_t query_blocks = (p.seqlen_q + 63) / 64;
  TORCH_CHECK(query_blocks * splits <= std::numeric_limits<int>::max(),
              "attention (cuda backend): ", splits, " splits of ", p.seqlen_k, " keys over ",
              query_blocks, " query blocks exceed the grid; use more keys per split");
  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  at::Tensor o_partial = at::empty({splits, lse_rows(p), p.head_dim}, fp32);
  at::Tensor lse_partial = at::empty({splits, lse_rows(p)}, fp32);
  p.o_partial = o_partial.data_ptr<float>();
  p.lse_partial = lse_partial.data_ptr<float>();
  return {o_partial, lse_partial};
}

// out (and lse) must be allocated by the caller in the layout it returns.
void forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
             const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
             bool causal, double scale, const Dropout& dropout, const Packing* packing,
             int64_t keys_per_split) {
  check_inputs(q_in, k_in, v_in);
  const at::Tensor q = vector_readable(q_in), k = vector_readable(k_in), v = vector_readable(v_in);
  AttentionParams p = make_params(q, k, v, scale);
  if (poison_outputs()) {
    out.fill_(NAN);
    lse.fill_(NAN);
  }
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.lse = lse.data_ptr<float>();
  set_mask(p, mask, q, k);
  dropout.apply(p, q);
  if (packing != nullptr) packing->apply(p);
  const auto partials = split_keys(p, keys_per_split, q);
  launch(p, causal, q, false);
}

// (dq, dk, dv) allocated by the caller; lse and delta laid out as the forward wrote lse.
void backward(const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
              const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& delta,
              const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
              const at::Tensor* dmask, bool causal, double scale, const Dropout& dropout,
              const Packing* packing) {
  check_inputs(q_in, k_in, v_in);
  check_operand(grad_out_in, "grad_out", q_in);
  check_operand(out, "out", q_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out.sizes() == q_in.sizes(),
              "attention backward: grad_out ", grad_out_in.sizes(), " and out ", out.sizes(),
              " must have the query's shape ", q_in.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.numel() == q_in.size(0) * q_in.size(1) * q_in.size(2) &&
                  lse.device() == q_in.device(),
              "attention backward: lse must be the forward's contiguous float32 tensor, got ",
              lse.scalar_type(), " ", lse.sizes(), " for query ", q_in.sizes());
  const at::Tensor q = vector_readable(q_in), k = vector_readable(k_in), v = vector_readable(v_in);
  const at::Tensor grad_out = vector_readable(grad_out_in);
  AttentionParams p = make_params(q, k, v, scale);
  if (poison_outputs()) {
    dq.fill_(NAN);
    dk.fill_(NAN);
    dv.fill_(NAN);
  }
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.delta = delta.data_ptr<float>();
  p.grad_out = grad_out.data_ptr();
  p.grad_out_strides = strides_of(grad_out);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_strides = strides_of(dq);
  p.dk_strides = strides_of(dk);
  p.dv_strides = strides_of(dv);
  set_mask(p, mask, q, k);
  if (dmask != nullptr) {
    p.dmask = dmask->data_ptr<float>();
    p.dmask_strides = broadcast_strides(*dmask);
  }
  dropout.apply(p, q);
  if (packing != nullptr) packing->apply(p);
  launch(p, causal, q, true);
}

// delta = rowsum(dO * O) in fp32: the softmax backward's per-row constant.
at::Tensor row_delta(const at::Tensor& grad_out, const at::Tensor& out) {
  return (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask,
                                                      bool causal, double scale, double dropout_p,
                                                      const std::optional<at::Tensor>& seed,
                                                      int64_t keys_per_split) {
  c10::cuda::CUDAGuard guard(q.device());
  check_operand(q, "query", q);
  // Laid out as q where q is (batch, seq, heads, dim) memory seen as (batch, heads, seq,
  // dim), as PyTorch's SDPA returns it (ops/attention.py's _new_attention_output, which the
  // fake implementation calls); the kernels write through out's strides.
  at::Tensor out = q.stride(1) < q.stride(2)
                       ? at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options())
                             .transpose(1, 2)
                       : at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  forward(q, k, v, mask, out, lse, causal, scale, Dropout{dropout_p, seed}, nullptr,
          keys_per_split);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
    bool causal, double scale, bool mask_grad, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& grad_lse) {
  c10::cuda::CUDAGuard guard(q.device());
  check_inputs(q, k, v);
  TORCH_CHECK(!mask_grad || (mask.has_value() && mask->is_floating_point()),
              "attention backward: mask_grad needs an additive (floating-point) mask");
  TORCH_CHECK(!grad_lse.has_value() || grad_lse->sizes() == lse.sizes(),
              "attention backward: grad_lse ", grad_lse->sizes(), " must have lse's shape ",
              lse.sizes());  // (the message is built only when the check fails)
  // A score's gradient is P (dP - delta) for a row's delta = rowsum(dO * O); lse's gradient
  // adds P * grad_lse (d lse / d s = P), so it folds into delta: delta - grad_lse.
  at::Tensor delta = row_delta(grad_out, out);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(at::kFloat);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  // The additive mask's gradient: fp32 in the mask's own shape, summed over what it
  // broadcasts by atomic adds (so zeros first).
  at::Tensor dmask = mask_grad ? at::zeros(mask->sizes(), q.options().dtype(at::kFloat))
                               : at::empty({0}, q.options().dtype(at::kFloat));
  backward(grad_out, q, k, v, mask, out, lse, delta.contiguous(), dq, dk, dv,
           mask_grad ? &dmask : nullptr, causal, scale, Dropout{dropout_p, seed}, nullptr);
  return {dq, dk, dv, dmask};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, int64_t keys_per_split) {
  c10::cuda::CUDAGuard guard(q.device());
  const Packing packing{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  const at::Tensor q4 = as_dense(q, "q");
  check_operand(q4, "q", q4);
  packing.check(q);
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(-1)}, q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  forward(q4, as_dense(k, "k"), as_dense(v, "v"), std::nullopt, as_dense(out, "out"), lse,
          causal, scale, Dropout{dropout_p, seed}, &packing, keys_per_split);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& grad_lse) {
  c10::cuda::CUDAGuard guard(q.device());
  const Packing packing{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  const at::Tensor q4 = as_dense(q, "q"), k4 = as_dense(k, "k"), v4 = as_dense(v, "v");
  check_inputs(q4, k4, v4);
  packing.check(q);
  TORCH_CHECK(!grad_lse.has_value() || grad_lse->sizes() == lse.sizes(),
              "varlen_attention backward: grad_lse ", grad_lse->sizes(),
              " must have lse's shape ", lse.sizes());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = row_delta(grad_out, out).t();  // (heads, tokens), as lse
  if (grad_lse.has_value()) delta = delta - grad_lse->to(at::kFloat);  // as attention_bwd_cuda
  backward(as_dense(grad_out, "grad_out"), q4, k4, v4, std::nullopt, as_dense(out, "out"), lse,
           delta.contiguous(), as_dense(dq, "dq"), as_dense(dk, "dk"), as_dense(dv, "dv"),
           nullptr, causal, scale, Dropout{dropout_p, seed}, &packing);
  return {dq, dk, dv};
}

}  // namespace tilesmith

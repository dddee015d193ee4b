// The fused epilogue of matmul/gemm (and conv2d's implicit GEMMs), written once for both
// main loops: mainloop_sm80.cuh (mma.sync) and matmul_sm90a.cuh (wgmma). Both hold their
// fp32 accumulators in the mma m16n8 layout, so each thread owns pairs of neighbouring
// columns of a row, and that pair is the unit written here:
//   c = act(alpha * acc + bias) + residual,  pre = alpha * acc + bias (when params.pre is set),
// or with params.residual_before_activation (conv2d)
//   c = act(alpha * acc + bias + residual),  pre = alpha * acc + bias + residual.
#pragma once

#include <type_traits>

#include "../common/mma_sm80.cuh"
#include "matmul.h"

namespace tilesmith {

// As torch's hardtanh(v, 0, 6): a NaN stays NaN.
__device__ __forceinline__ float relu6(float v) {
  return v <= 0.0f ? 0.0f : (v >= 6.0f ? 6.0f : v);
}

__device__ __forceinline__ float activate(float v, Activation activation) {
  switch (activation) {
    case Activation::kRelu:
      return v < 0.0f ? 0.0f : v;  // a NaN stays NaN, as in torch.relu (fmaxf gives 0)
    case Activation::kGelu:
      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case Activation::kSilu:
      return v / (1.0f + expf(-v));
    case Activation::kRelu6:
      return relu6(v);
    case Activation::kHardswish:
      return v * relu6(v + 3.0f) * (1.0f / 6.0f);
    case Activation::kSigmoid:
      return 1.0f / (1.0f + expf(-v));
    case Activation::kHardsigmoid:
      return relu6(v + 3.0f) * (1.0f / 6.0f);
    default:
      return v;
  }
}

template <typename OutT>
__device__ __forceinline__ OutT to_out(float v) {
  if constexpr (std::is_same_v<OutT, float>) {
    return v;
  } else {
    return from_float<OutT>(v);
  }
}

// Two neighbouring columns (col, col + 1) of one row: one 4- or 8-byte store when both are
// in range and aligned, else element by element.
template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* out, float v0, float v1, bool paired,
                                           bool has0, bool has1) {
  if (paired && has1) {
    OutT pair[2] = {to_out<OutT>(v0), to_out<OutT>(v1)};
    if constexpr (sizeof(OutT) == 4) {
      *reinterpret_cast<float2*>(out) = *reinterpret_cast<const float2*>(pair);
    } else {
      *reinterpret_cast<uint32_t*>(out) = *reinterpret_cast<const uint32_t*>(pair);
    }
    return;
  }
  if (has0) out[0] = to_out<OutT>(v0);
  if (has1) out[1] = to_out<OutT>(v1);
}

// The epilogue of batch z's output. T: the operands' type; OutT: T or float, the type of
// c, residual and pre (an fp32 output keeps its pre-activation in fp32 for the backward).
template <typename T, typename OutT>
struct EpilogueWriter {
  const MatmulParams& params;
  OutT* c;
  const OutT* residual;
  OutT* pre;
  bool paired_stores, paired_pre;  // row strides that keep column pairs 2-element aligned

  __device__ __forceinline__ EpilogueWriter(const MatmulParams& p, int64_t z)
      : params(p),
        c(static_cast<OutT*>(p.c) + z * p.c_batch_stride),
        residual(p.residual == nullptr
                     ? nullptr
                     : static_cast<const OutT*>(p.residual) + z * p.residual_batch_stride),
        pre(p.pre == nullptr ? nullptr : static_cast<OutT*>(p.pre) + z * p.pre_batch_stride),
        paired_stores(p.c_row_stride % 2 == 0),
        paired_pre(p.pre_row_stride % 2 == 0) {}

  // Where the tile's row `row` is written: that row of the output, or -1 past its m rows.
  // store_tile asks once per row and passes the answer to write() for each column pair.
  __device__ __forceinline__ int64_t place(int64_t row) const {
    return row < params.m ? row : -1;
  }

  __device__ __forceinline__ void add_residual(int64_t row, int64_t col, bool has0, bool has1,
                                               float (&v)[2]) const {
    const OutT* r = residual + row * params.residual_row_stride + col;
    if (has0) v[0] += to_float<OutT>(r[0]);
    if (has1) v[1] += to_float<OutT>(r[1]);
  }

  // Columns col (even) and col + 1 of output row `row` (place()'s answer) from their
  // accumulators; what lies outside the m x n output is skipped. The branches on params
  // are uniform across the block.
  __device__ __forceinline__ void write(int64_t row, int64_t col, float acc0, float acc1) const {
    if (row < 0) return;
    const bool has0 = col < params.n, has1 = col + 1 < params.n;
    float v[2] = {acc0 * params.alpha, acc1 * params.alpha};
    if (params.bias != nullptr) {
      if (has0) v[0] += params.bias[col];
      if (has1) v[1] += params.bias[col + 1];
    }
    const bool residual_first = params.residual_before_activation;
    if (residual != nullptr && residual_first) add_residual(row, col, has0, has1, v);
    if (pre != nullptr) {
      store_pair<OutT>(pre + row * params.pre_row_stride + col, v[0], v[1], paired_pre, has0,
                       has1);
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) v[e] = activate(v[e], params.activation);
    if (residual != nullptr && !residual_first) add_residual(row, col, has0, has1, v);
    store_pair<OutT>(c + row * params.c_row_stride + col, v[0], v[1], paired_stores, has0, has1);
  }
};

}  // namespace tilesmith

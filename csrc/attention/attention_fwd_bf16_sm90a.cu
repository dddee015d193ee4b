// One dtype per file: the Hopper attention forward's kernels (TMA-fed and cp.async, causal
// and not) compile in parallel with the other dtype's.
#include "../common/hopper_kernels.h"  // tma_kernels
#include "attention_fwd_tma_sm90a.cuh"

namespace tilesmith {
cudaError_t run_attention_fwd_sm90a_bf16(const AttentionParams& params, bool causal,
                                        cudaStream_t stream) {
  return attention_tma_sm90a::run<__nv_bfloat16>(params, causal, tma_kernels(), stream);
}
}  // namespace tilesmith

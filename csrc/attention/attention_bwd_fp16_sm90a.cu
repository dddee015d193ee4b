// One dtype per file: the Hopper attention backward's kernels (causal and not) compile in
// parallel with the other dtype's and with the forward's.
#include "attention_bwd_sm90a.cuh"

namespace tilesmith {
cudaError_t run_attention_bwd_sm90a_fp16(const AttentionParams& params, bool causal,
                                         cudaStream_t stream) {
  return attention_sm90a::run_bwd<__half>(params, causal, stream);
}
}  // namespace tilesmith

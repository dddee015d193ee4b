// One dtype per file: the Hopper attention forward's kernels (causal and not) compile in
// parallel with the other dtype's.
#include "attention_fwd_sm90a.cuh"

namespace tilesmith {
cudaError_t run_attention_fwd_sm90a_fp16(const AttentionParams& params, bool causal,
                                        cudaStream_t stream) {
  return attention_sm90a::run<__half>(params, causal, stream);
}
}  // namespace tilesmith

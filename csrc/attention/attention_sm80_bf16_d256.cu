// One (dtype, head dim) per file: its forward and backward kernels, causal and not, compile
// in parallel with the other three files'.
#include "attention_bwd_sm80.cuh"

namespace tilesmith {
cudaError_t run_attention_fwd_sm80_bf16_d256(
    const AttentionParams& params, bool causal, cudaStream_t stream) {
  return attention_sm80::run_fwd<__nv_bfloat16, 256>(params, causal, stream);
}
cudaError_t run_attention_bwd_sm80_bf16_d256(
    const AttentionParams& params, bool causal, cudaStream_t stream) {
  return attention_sm80::run_bwd<__nv_bfloat16, 256>(params, causal, stream);
}
}  // namespace tilesmith

// One (dtype, head dim) per file: its forward and backward kernels, causal and not, compile
// in parallel with the other three files'.
#include "attention_bwd_sm80.cuh"

namespace tilesmith {
cudaError_t run_attention_fwd_sm80_fp16_d256(
    const AttentionParams& params, bool causal, cudaStream_t stream) {
  return attention_sm80::run_fwd<__half, 256>(params, causal, stream);
}
cudaError_t run_attention_bwd_sm80_fp16_d256(
    const AttentionParams& params, bool causal, cudaStream_t stream) {
  return attention_sm80::run_bwd<__half, 256>(params, causal, stream);
}
}  // namespace tilesmith

namespace tilesmith {
int attention_sm80_d256_smem_bytes() {
  using namespace attention_sm80;
  constexpr int kFwd = fwd_smem_bytes<__half, 256>(), kDkdv = dkdv_smem_bytes<__half, 256>(),
                kDq = dq_smem_bytes<__half, 256>();
  return kFwd > kDkdv ? (kFwd > kDq ? kFwd : kDq) : (kDkdv > kDq ? kDkdv : kDq);
}
}  // namespace tilesmith

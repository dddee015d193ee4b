// tilesmith._C_sm90a's entries for the Hopper attention forward and backward
// (common/hopper_kernels.h): they take dense and packed calls with head dims up to 128, with
// a mask or dropout but not both, on a device of compute capability 9.0
// (attention_fwd_sm90a.cuh's takes).
#include "../common/hopper_kernels.h"
#include "attention_fwd_sm90a.cuh"

namespace tilesmith {

bool run_attention_fwd_sm90a(const AttentionParams& params, bool causal, bool bf16,
                             cudaStream_t stream, cudaError_t* error) {
  if (!current_device_is_sm90() || !attention_sm90a::takes(params)) return false;
  *error = bf16 ? run_attention_fwd_sm90a_bf16(params, causal, stream)
                : run_attention_fwd_sm90a_fp16(params, causal, stream);
  return true;
}

bool run_attention_bwd_sm90a(const AttentionParams& params, bool causal, bool bf16,
                             cudaStream_t stream, cudaError_t* error) {
  if (!current_device_is_sm90() || !attention_sm90a::takes(params)) return false;
  *error = bf16 ? run_attention_bwd_sm90a_bf16(params, causal, stream)
                : run_attention_bwd_sm90a_fp16(params, causal, stream);
  return true;
}

}  // namespace tilesmith

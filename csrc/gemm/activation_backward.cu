// The activation-backward kernels for every (dz, grad, pre) dtype triple the ops make (see
// activation_backward.cuh): grad and pre in dz's dtype, an fp32 grad, or both fp32.
#include "activation_backward.cuh"

namespace tilesmith {

namespace {
template <typename T>
cudaError_t run_input_types(const ActivationBackwardParams& p, cudaStream_t stream) {
  if (p.pre_fp32) return activation_backward::run<T, float, float>(p, stream);
  return p.grad_fp32 ? activation_backward::run<T, float, T>(p, stream)
                     : activation_backward::run<T, T, T>(p, stream);
}
}  // namespace

cudaError_t run_activation_backward(const ActivationBackwardParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  return p.dz_bf16 ? run_input_types<__nv_bfloat16>(p, stream) : run_input_types<__half>(p, stream);
}

}  // namespace tilesmith

// The activation-backward kernels for every (dz dtype, grad dtype) pair (see
// activation_backward.cuh).
#include "activation_backward.cuh"

namespace tilesmith {

namespace {
template <typename T>
cudaError_t run_grad_type(const ActivationBackwardParams& p, cudaStream_t stream) {
  return p.grad_fp32 ? activation_backward::run<T, float>(p, stream)
                     : activation_backward::run<T, T>(p, stream);
}
}  // namespace

cudaError_t run_activation_backward(const ActivationBackwardParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  return p.pre_bf16 ? run_grad_type<__nv_bfloat16>(p, stream) : run_grad_type<__half>(p, stream);
}

}  // namespace tilesmith

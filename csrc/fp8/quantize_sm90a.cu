// The quantization kernels for every input dtype and fp8 format (see quantize_sm90a.cuh).
#include "quantize_sm90a.cuh"

namespace tilesmith {

namespace {
template <typename T>
cudaError_t run_format(const QuantizeParams& p, cudaStream_t stream) {
  return p.e5m2 ? fp8_quantize::run<T, true>(p, stream) : fp8_quantize::run<T, false>(p, stream);
}
}  // namespace

cudaError_t run_quantize_fp8_sm90a(const QuantizeParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.k == 0) return cudaSuccess;
  switch (p.input) {
    case QuantizeInput::kBFloat16: return run_format<__nv_bfloat16>(p, stream);
    case QuantizeInput::kFloat16: return run_format<__half>(p, stream);
    default: return run_format<float>(p, stream);
  }
}

}  // namespace tilesmith

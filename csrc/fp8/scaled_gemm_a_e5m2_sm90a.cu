// One fp8 format of a per file: the kernels for both formats of b compile in parallel with
// the other file's.
#include "../common/hopper_kernels.h"  // tma_kernels
#include "scaled_gemm_sm90a.cuh"

namespace tilesmith {
cudaError_t run_scaled_gemm_sm90a_a_e5m2(const ScaledGemmParams& params, bool b_e5m2,
                                         cudaStream_t stream) {
  return b_e5m2 ? fp8_sm90a::run<__nv_fp8_e5m2, __nv_fp8_e5m2>(params, tma_kernels(), stream)
                : fp8_sm90a::run<__nv_fp8_e5m2, __nv_fp8_e4m3>(params, tma_kernels(), stream);
}
}  // namespace tilesmith

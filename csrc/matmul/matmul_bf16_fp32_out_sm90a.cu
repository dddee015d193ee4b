// One dtype and output type per file (see matmul_bf16_sm90a.cu): c in fp32.
#include "matmul_tma_sm90a.cuh"

namespace tilesmith {
cudaError_t run_matmul_sm90a_bf16_fp32_out(const MatmulParams& params, bool tma,
                                           cudaStream_t stream) {
  return matmul_tma_sm90a::run<__nv_bfloat16, float>(params, tma, stream);
}
}  // namespace tilesmith

// One dtype per file: the eight layout/load variants of each compile in parallel with the
// other dtype's.
#include "matmul_sm80.cuh"

namespace tilesmith {
cudaError_t run_matmul_sm80_bf16(const MatmulParams& params, cudaStream_t stream) {
  return matmul_sm80::run<__nv_bfloat16>(params, stream);
}
}  // namespace tilesmith

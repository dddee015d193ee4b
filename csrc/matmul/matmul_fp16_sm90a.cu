// One dtype per file: the layout/width/output variants of each compile in parallel with the
// other dtype's.
#include "matmul_sm90a.cuh"

namespace tilesmith {
cudaError_t run_matmul_sm90a_fp16(const MatmulParams& params, cudaStream_t stream) {
  return matmul_sm90a::run<__half>(params, stream);
}
}  // namespace tilesmith

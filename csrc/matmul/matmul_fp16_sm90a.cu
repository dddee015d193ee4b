// One dtype and output type per file: the 16 layout/width variants of each compile in
// parallel with the others' (one file of 32 took most of the build's critical path).
#include "matmul_tma_sm90a.cuh"

namespace tilesmith {
cudaError_t run_matmul_sm90a_fp16(const MatmulParams& params, bool tma,
                                  cudaStream_t stream) {
  return matmul_tma_sm90a::run<__half, __half>(params, tma, stream);
}
}  // namespace tilesmith

// One pass and dtype per file: the Hopper conv2d's six pairs of tile widths compile in
// parallel.
#include "conv2d_sm90a.cuh"

namespace tilesmith {
cudaError_t run_conv2d_wgrad_sm90a_fp16(const ConvParams& conv, const MatmulParams& out,
                                        int splits, cudaStream_t stream) {
  return conv2d_sm90a::run<kWgrad, __half>(conv, out, splits, stream);
}
}  // namespace tilesmith

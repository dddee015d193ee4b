// One pass and dtype per file: the Hopper conv2d's six pairs of tile widths compile in
// parallel.
#include "conv2d_sm90a.cuh"

namespace tilesmith {
cudaError_t run_conv2d_fwd_sm90a_fp16(const ConvParams& conv, const MatmulParams& out,
                                      cudaStream_t stream) {
  return conv2d_sm90a::run<kForward, __half>(conv, out, 1, stream);
}
}  // namespace tilesmith

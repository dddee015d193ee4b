// One dtype per file: the forward's two tile widths compile in parallel with the other
// dtype's.
#include "conv2d_sm90a.cuh"

namespace tilesmith {
cudaError_t run_conv2d_fwd_sm90a_bf16(const ConvParams& conv, const MatmulParams& out,
                                      cudaStream_t stream) {
  return conv2d_sm90a::run_fwd<__nv_bfloat16>(conv, out, stream);
}
}  // namespace tilesmith
